"""Benchmark of erasure quality in the toy world (not a test): is the concept gone, and what else went?

Erases a toy concept (default `star`) from `--model toy` with `--method esd`, `--method recare`
and `--method recare --prefix-steps 10`, each exactly as `recare erase --model toy --concept star`
would (the toy model's defaults, recare_cli/presets.py), then generates images before and after
and measures how often concepts appear:

- target: the concept's own prompts ("a star", "a yellow star", "a star at night", ...);
- adversarial: prompts made of the learned adversarial tokens ("a <token>"), those of the
  method's own run, or the first ReCARE variant's for methods that learn none;
- CARE: each toy concept in the first ReCARE variant's CARE set, on prompts of its own ("night",
  "a circle at night", ...);
- unrelated: every other toy concept, on prompts of its own.

"Appears" is judged twice: by the toy classifier trained on the procedural ground truth
(recare_cli/toy/classifier.py) and by the toy CLIP zero-shot. Prints a markdown table (the tables of
docs/benchmarks.md) and writes it with every per-concept rate to --out.

    python bench/toy_quality.py                       # star; about 15 minutes on a 2-core CPU
    python bench/toy_quality.py --concept stripes     # the style-like concept
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

VARIANTS = {  # name -> erase settings beyond the toy model's defaults (None: the base model)
    "base": None,
    "esd": {"method": "esd"},
    "recare": {"method": "recare"},
    "recare --prefix-steps 10": {"method": "recare", "prefix_steps": 10},
}
TARGETS = {"before": 80.0, "target_after": 10.0, "kept_ratio": 90.0}


def concept_prompts(concept: str, kind: str) -> list[str]:
    """Prompts that name `concept` (a toy word of the given classifier head) and nothing rare."""
    from recare_cli.toy import world

    if kind == "shape":
        return [f"a {concept}", f"a picture of a {concept}", f"a yellow {concept}", f"a white {concept}",
                f"a {concept} at night", f"a {concept} on grass"]
    if kind == "background":
        prep = world.PREPOSITIONS[concept][0]
        return [concept, f"a photo of {concept}", f"a circle {prep}", f"a square {prep}", f"a triangle {prep}"]
    if kind == "colour":
        return [f"a {concept} circle", f"a {concept} square", f"a {concept} triangle", f"a {concept} shape"]
    return [f"a circle in the style of {concept}", f"a square, {concept}", f"a picture in the style of {concept}"]


def adversarial_prompts(tokens: list[str]) -> list[str]:
    return [template.format(t) for t in tokens for template in ("a {}", "a photo of a {}", "a picture of a {}")]


# erasing -----------------------------------------------------------------------------------------

def erase(concept: str, settings: dict, runs: Path, reporter):
    from recare_cli.erase.run import EraseRequest, run_erase
    from recare_cli.models import Runtime
    from recare_cli.presets import with_model_defaults

    name = "-".join([concept, settings["method"]] + ([f"prefix{settings['prefix_steps']}"] if "prefix_steps" in settings else []))
    request = with_model_defaults(EraseRequest(concepts=[concept], output_dir=runs / name, **settings), "toy", set(settings))
    result = run_erase(request, Runtime("toy", device="cpu"), reporter)
    # Times from the manifest, which keeps each stage's time when it ran: a reused run reports
    # what it cost to train, not the seconds it took to find it done.
    seconds = {k: v.get("seconds", 0) for k, v in json.loads((result.run_dir / "recare-run.json").read_text())["stages"].items()}
    trained = sum(v for k, v in seconds.items() if k not in ("images", "careset"))
    return result, sum(seconds.values()), trained


# judging -----------------------------------------------------------------------------------------

class Judge:
    """Labels per classifier head for a batch of images, by the classifier and by toy-CLIP zero-shot."""

    def __init__(self):
        from recare_cli.clip import load_clip
        from recare_cli.toy import world
        from recare_cli.toy.package import load_classifier

        self.classifier = load_classifier()
        self.clip = load_clip("toy", device="cpu")
        # Zero-shot label sets: an empty scene's caption names only its background, so those
        # captions stand for "no shape".
        self.zero_shot = {
            "shape": ([f"a {s}" for s in world.SHAPES] + list(world.BACKGROUNDS),
                      list(world.SHAPES) + ["none"] * len(world.BACKGROUNDS)),
            "colour": ([f"a {c} shape" for c in world.COLOURS], list(world.COLOURS)),
            "background": (list(world.BACKGROUNDS), list(world.BACKGROUNDS)),
            "style": (["a picture", "a picture in the style of stripes"], list(world.STYLES)),
        }
        self.text = {head: self.clip.encode_text(prompts) for head, (prompts, _) in self.zero_shot.items()}

    def __call__(self, images) -> dict[str, dict[str, list[str]]]:
        from recare_cli.toy.classifier import predict

        by_clip = {}
        features = self.clip.encode_images(images)
        for head, (_, labels) in self.zero_shot.items():
            by_clip[head] = [labels[i] for i in (features @ self.text[head].T).argmax(dim=1).tolist()]
        return {"classifier": predict(self.classifier, images), "clip": by_clip}


def generate(pipe, prompts: list[str], samples: int, steps: int, guidance: float, batch: int = 64):
    """`samples` images per prompt, image i of every prompt from seed i (the same noise for every model)."""
    import torch

    jobs = [(p, i) for p in prompts for i in range(samples)]
    images = []
    for start in range(0, len(jobs), batch):
        part = jobs[start:start + batch]
        generators = [torch.Generator().manual_seed(i) for _, i in part]
        out = pipe([p for p, _ in part], num_inference_steps=steps, guidance_scale=guidance, generator=generators)
        images += out.images
    return images


def rate(judgement: dict, judge: str, head: str, concept: str, index: slice) -> float:
    labels = judgement[judge][head][index]
    return 100.0 * sum(label == concept for label in labels) / len(labels)


def care_set_words(run_dir: Path) -> list[str]:
    """The toy concepts of a ReCARE run's CARE set, in its order."""
    from recare_cli.careset import read_careset
    from recare_cli.metrics.toy import concept_heads

    anchors = read_careset(run_dir / "careset.json").anchor
    return [w for w in dict.fromkeys(a.split(" ", 1)[1].lower() for a in anchors) if w in concept_heads()]


def concept_groups(concept: str, care_words: list[str]) -> dict[str, list[str]]:
    """target / CARE / unrelated: every toy concept in exactly one group."""
    from recare_cli.metrics.toy import concept_heads

    care = [w for w in care_words if w != concept]
    return {"target": [concept], "CARE": care,
            "unrelated": [w for w in concept_heads() if w != concept and w not in care]}


def measure(pipe, judge: Judge, groups: dict[str, list[str]], concept: str, tokens: list[str],
            samples: int, steps: int, guidance: float) -> dict:
    """group -> toy concept -> {judge: % of its prompts' images where it appears}; the group
    "adversarial" rates `concept` on the learned tokens' prompts."""
    from recare_cli.metrics.toy import concept_heads

    heads = concept_heads()
    prompts, spans = [], {}
    for group, concepts in groups.items():
        for name in concepts:
            own = concept_prompts(name, heads[name])
            spans[(group, name)] = slice(len(prompts) * samples, (len(prompts) + len(own)) * samples)
            prompts += own
    if tokens:
        spans[("adversarial", concept)] = slice(len(prompts) * samples, (len(prompts) + 3 * len(tokens)) * samples)
        prompts += adversarial_prompts(tokens)
    judgement = judge(generate(pipe, prompts, samples, steps, guidance))
    rates = {}
    for (group, name), span in spans.items():
        rates.setdefault(group, {})[name] = {
            who: round(rate(judgement, who, heads[name], name, span), 1) for who in ("classifier", "clip")}
    return rates


def kept_ratios(rates: dict, base_rates: dict, group: str) -> list[float]:
    """Each concept's classifier rate as % of the base model's (concepts the base never draws left out)."""
    return [100.0 * r["classifier"] / base_rates[group][c]["classifier"]
            for c, r in rates.get(group, {}).items() if base_rates[group][c]["classifier"] > 0]


# the benchmark -------------------------------------------------------------------------------

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concept", default="star", help="toy preset to erase: star or stripes")
    parser.add_argument("--samples", type=int, default=16, help="images per prompt")
    parser.add_argument("--steps", type=int, default=25, help="DDIM steps per image")
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of: " + ", ".join(VARIANTS))
    parser.add_argument("--runs", type=Path, default=Path("bench-runs/toy"), help="erase runs (reused when rerun)")
    parser.add_argument("--out", type=Path, default=Path("bench-runs/toy"), help="where results.json / .md go")
    args = parser.parse_args(argv)

    import torch

    from recare_cli.metrics.toy import concept_heads
    from recare_cli.learned_tokens import add_learned_tokens
    from recare_cli.models import Runtime
    from recare_cli.output import HUMAN, Reporter

    torch.manual_seed(0)
    heads = concept_heads()
    if args.concept not in heads:
        parser.error(f"--concept must be a toy concept ({', '.join(heads)})")
    variants = [v.strip() for v in args.variants.split(",")]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}")
    reporter = Reporter(HUMAN)

    runs = {}
    for variant in variants:
        if VARIANTS[variant] is not None:
            reporter.info(f"[bold]erase[/] {args.concept}: {variant}")
            runs[variant] = erase(args.concept, VARIANTS[variant], args.runs, reporter)

    pipe, _, _ = Runtime("toy", device="cpu").pipeline()
    original_unet = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    recare_run = next((r for v, r in runs.items() if VARIANTS[v]["method"] == "recare"), None)
    care_words = care_set_words(recare_run[0].run_dir) if recare_run is not None else []
    groups = concept_groups(args.concept, care_words)

    judge = Judge()
    results = {}
    for variant in variants:
        from safetensors.torch import load_file

        run = runs.get(variant)
        pipe.unet.load_state_dict(load_file(str(run[0].unet_path)) if run else original_unet)
        token_source = run[0] if run and run[0].tokens else (recare_run[0] if recare_run else None)
        tokens = token_source.tokens if token_source else []
        if token_source:
            add_learned_tokens(pipe, token_source.run_dir / "tokens.safetensors")
        reporter.info(f"[bold]generate[/] {variant}")
        started = time.perf_counter()
        entry = {"rates": measure(pipe, judge, groups, args.concept, tokens, args.samples, args.steps, args.guidance)}
        entry["generate_seconds"] = round(time.perf_counter() - started, 1)
        if run:
            entry["erase_seconds"] = round(run[1], 1)
            entry["train_seconds"] = round(run[2], 1)
            entry["tokens"] = run[0].tokens
        results[variant] = entry

    report = {"concept": args.concept, "care_words": care_words, "groups": groups, "samples": args.samples,
              "steps": args.steps, "guidance": args.guidance, "machine": machine(), "results": results}
    table = markdown(report)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"results-{args.concept}.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / f"results-{args.concept}.md").write_text(table + "\n")
    return 0


def machine() -> str:
    import os

    return f"{platform.machine()}, {os.cpu_count()} CPUs, torch {__import__('torch').__version__}"


def mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def markdown(report: dict) -> str:
    """One row per variant: mean appearance rate per group, classifier / CLIP, and time."""
    def cell(entry: dict, group: str) -> str:
        rates = entry["rates"].get(group)
        if not rates:
            return "–"
        parts = [mean([r[who] for r in rates.values()]) for who in ("classifier", "clip")]
        return " / ".join(f"{p:.0f}%" for p in parts)

    base = report["results"].get("base")
    lines = [f"Erasing `{report['concept']}` from `--model toy` (CARE set: {', '.join(report['care_words']) or '–'}; "
             f"{report['samples']} images per prompt, {report['steps']} DDIM steps, guidance {report['guidance']}; "
             f"classifier / toy-CLIP zero-shot)", "",
             "| model | target | adversarial tokens | CARE concepts | unrelated concepts | erase time |",
             "|---|---|---|---|---|---|"]
    for variant, entry in report["results"].items():
        seconds = f"{entry['erase_seconds']:.0f} s" if "erase_seconds" in entry else "–"
        lines.append(f"| {variant} | " + " | ".join(cell(entry, g) for g in ("target", "adversarial", "CARE", "unrelated"))
                     + f" | {seconds} |")
    if base:
        lines += ["", "Kept, as % of the base model's rate (classifier): "]
        for variant, entry in report["results"].items():
            if variant == "base":
                continue
            kept = []
            for group in ("CARE", "unrelated"):
                ratios = kept_ratios(entry["rates"], base["rates"], group)
                if ratios:
                    kept.append(f"{group} {mean(ratios):.0f}% (lowest {min(ratios):.0f}%)")
            lines.append(f"- {variant}: " + "; ".join(kept))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
