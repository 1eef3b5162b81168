"""`toy`: how often each toy-world concept a prompt names appears, judged by the toy classifier.

For `--model toy` (recare_cli/toy/). The classifier was trained on the procedural ground truth, so
"appears" means: its head for the concept's kind (shape, colour, background, style) picks the
concept. Each prompt is scored on every toy word it contains, plus `--target` if given (so
"a yellow shape" can be checked for `star`). Images without a prompt are scored on `--target` only.
"""

from __future__ import annotations

import re

from recare_cli.errors import UsageError
from recare_cli.evaluate import EvalContext, Row, open_rgb


def concept_heads() -> dict[str, str]:
    """Toy word -> the classifier head that recognises it."""
    from recare_cli.toy.classifier import HEADS

    return {label: head for head, labels in HEADS.items() for label in labels if label not in ("none", "plain")}


def named_concepts(prompt: str | None, heads: dict[str, str]) -> list[str]:
    words = re.findall(r"[a-z]+", (prompt or "").lower())
    return [w for w in dict.fromkeys(words) if w in heads]


def check(ctx: EvalContext) -> None:
    heads = concept_heads()
    target = ctx.option("target")
    if target is not None and target.lower() not in heads:
        raise UsageError(f"--target '{target}' is not a toy-world concept", hint=f"one of {', '.join(heads)}")


def run(ctx: EvalContext) -> list[Row]:
    from recare_cli.toy.classifier import predict
    from recare_cli.toy.package import load_classifier

    check(ctx)
    heads = concept_heads()
    target = ctx.option("target")
    classifier = ctx.shared("toy-classifier", load_classifier)
    images = ctx.images()
    with ctx.reporter.progress(f"toy ({ctx.label})", total=len(images)) as task:
        pictures = []
        for image in images:
            pictures.append(open_rgb(image))
            task.advance(1)
        labels = predict(classifier, pictures)
    rows, hits = [], {}
    for i, image in enumerate(images):
        seen = {head: labels[head][i] for head in labels}
        judged = {}
        for concept in dict.fromkeys(named_concepts(image.prompt, heads) + ([target.lower()] if target else [])):
            judged[concept] = seen[heads[concept]] == concept
            key = (image.prompt or "", concept)
            found, total = hits.get(key, (0, 0))
            hits[key] = (found + int(judged[concept]), total + 1)
        verdict = ", ".join(f"{concept}: {'yes' if present else 'no'}" for concept, present in judged.items())
        rows.append(Row({"image": image.file}, {**seen, "verdict": verdict}, detail=True))
    for (prompt, concept), (found, total) in hits.items():
        rows.append(Row({"prompt": prompt, "concept": concept},
                        {"appears_pct": 100.0 * found / total, "images": total}))
    return rows
