"""What bench/toy_frontier.py measures of one model, and how: the prompts, derived from the toy world's
captions (target on common and rare contexts, every other concept on its own and with the target),
and the toy classifier's rate for each, on images from the same noise for every model."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

CONCEPT = "star"
RARE_BELOW = 10.0  # % of the target's captions


def context_frequencies(concept: str, n: int = 40_000, seed: int = 0) -> dict[str, float]:
    """% of the captions naming `concept` that also name each colour, background and style."""
    import numpy as np

    from recare_cli.toy import world

    rng = np.random.default_rng(seed)
    words = list(world.COLOURS) + list(world.BACKGROUNDS) + ["stripes"]
    named, counts = 0, dict.fromkeys(words, 0)
    for _ in range(n):
        caption = world.caption(world.sample_scene(rng), rng)
        present = set(caption.replace(",", " ").split())
        if concept in present:
            named += 1
            for word in words:
                counts[word] += word in present
    return {word: 100.0 * c / named for word, c in counts.items()}


def with_context(concept: str, word: str, prefix: str = "") -> str:
    """A prompt for `concept` in one context word, phrased as the toy captions phrase it."""
    from recare_cli.toy import world

    if word in world.COLOURS:
        return f"{prefix}a {word} {concept}"
    if word in world.BACKGROUNDS:
        return f"{prefix}a {concept} {world.PREPOSITIONS[word][1]}"
    return f"{prefix}a {concept} in the style of {word}"


def target_prompts(concept: str, frequencies: dict[str, float]) -> dict[str, list[str]]:
    """common: one prompt per context word in >= 10% of the concept's captions; rare: each rarer
    word alone and with two common ones. None is a training prompt ("a star")."""
    from recare_cli.toy import world

    common = [w for w, f in frequencies.items() if f >= RARE_BELOW]
    rare = [w for w, f in frequencies.items() if f < RARE_BELOW]
    colours = [w for w in common if w in world.COLOURS]
    prompts = {"common": [with_context(concept, w, "a picture of " if i % 2 else "") for i, w in enumerate(common)],
               "rare": []}
    for word in rare:
        prompts["rare"] += [with_context(concept, word), with_context(concept, word, "a photo of ")]
        if word in world.BACKGROUNDS:
            prompts["rare"] += [f"a {c} {concept} {world.PREPOSITIONS[word][0]}" for c in colours[:2]]
    return prompts


def own_prompts(word: str, kind: str) -> list[str]:
    """Two prompts that name `word` and not the target (bench/toy_quality.py's, first two)."""
    import toy_quality

    prompts = toy_quality.concept_prompts(word, kind)
    return prompts[:2] if kind != "background" else [prompts[0], prompts[2]]


def plan_prompts(concept: str, care: list[str], frequencies: dict[str, float]) -> list[tuple[str, str, str, str]]:
    """(group, concept measured, head, prompt) for every image prompt of a measurement."""
    from recare_cli.metrics.toy import concept_heads

    heads = concept_heads()
    rows = []
    targets = target_prompts(concept, frequencies)
    for group, prompts in targets.items():
        rows += [(f"target-{group}", concept, heads[concept], p) for p in prompts]
    for word in heads:
        if word == concept:
            continue
        group = "CARE" if word in care else "unrelated"
        rows += [(group, word, heads[word], p) for p in own_prompts(word, heads[word])]
        if heads[word] != "shape":  # with the target word: the target prompts that name this word
            rows += [(f"{group}+target", word, heads[word], p)
                     for p in targets["common"] + targets["rare"] if word in p.replace(",", " ").split()]
    return rows


# --- measuring -------------------------------------------------------------------------------

def unet_state(model: dict, base_state: dict) -> dict:
    from safetensors.torch import load_file

    if model.get("snapshot"):
        return base_state | load_file(str(model["snapshot"]))
    if model.get("run") is None:
        return base_state
    return load_file(str(Path(model["run"]) / "unet.safetensors"))


def set_tokens(pipe, tokens_file: Path) -> list[str]:
    """Write a run's adversarial tokens into the pipeline (overwriting same-named rows of another run)."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file

    from recare_cli.learned_tokens import add_learned_tokens

    add_learned_tokens(pipe, tokens_file)
    table = pipe.text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        for name, row in load_file(str(tokens_file)).items():
            table[pipe.tokenizer.convert_tokens_to_ids(name)] = row.reshape(-1).to(table.dtype)
    with safe_open(str(tokens_file), framework="pt") as handle:
        return json.loads(handle.metadata()["tokens"])


def measure(pipe, classifier, rows, tokens: list[str], samples: int, steps: int, guidance: float) -> dict:
    """prompt -> {head: % of its images the classifier labels with the measured concept}."""
    import toy_quality

    from recare_cli.toy.classifier import predict

    rows = rows + [("adversarial", CONCEPT, "shape", p) for p in toy_quality.adversarial_prompts(tokens)]
    prompts = list(dict.fromkeys(r[3] for r in rows))
    labels = predict(classifier, toy_quality.generate(pipe, prompts, samples, steps, guidance))
    rates = []
    for group, word, head, prompt in rows:
        i = prompts.index(prompt)
        seen = labels[head][i * samples:(i + 1) * samples]
        rates.append({"group": group, "concept": word, "prompt": prompt,
                      "rate": 100.0 * sum(label == word for label in seen) / samples})
    return {"rates": rates}


@dataclass
class Measuring:
    """What every measurement shares: the toy pipeline, its base UNet, the classifier, the prompts' contexts."""

    pipe: object
    base_state: dict
    classifier: object
    frequencies: dict

    @classmethod
    def load(cls) -> "Measuring":
        from recare_cli.models import Runtime
        from recare_cli.toy.package import load_classifier

        pipe, _, _ = Runtime("toy", device="cpu").pipeline()
        return cls(pipe, {k: v.clone() for k, v in pipe.unet.state_dict().items()}, load_classifier(),
                   context_frequencies(CONCEPT))

    def measure(self, model: dict, care_set: list[str], tokens_file: Path | None, args, out: Path, **extra) -> None:
        """Measure `model` (its UNet, and its adversarial tokens when given) and write out/<name>.json."""
        import torch

        started = time.perf_counter()
        self.pipe.unet.load_state_dict(unet_state(model, self.base_state))
        tokens = set_tokens(self.pipe, tokens_file) if tokens_file is not None else []
        torch.manual_seed(0)
        entry = measure(self.pipe, self.classifier, plan_prompts(CONCEPT, care_set, self.frequencies), tokens,
                        args.samples, args.steps, args.guidance)
        entry |= {"model": {k: str(v) if isinstance(v, Path) else v for k, v in model.items()}, **extra,
                  "measure_seconds": round(time.perf_counter() - started, 1),
                  "samples": args.samples, "steps": args.steps, "guidance": args.guidance}
        (out / f"{model['name']}.json").write_text(json.dumps(entry, indent=1) + "\n")
