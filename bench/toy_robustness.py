"""Robustness in the toy world (a benchmark, not a test): does an erased `star` come back under attack?

Erases `star` from `--model toy` with each method (as `recare erase --model toy --concept star
--method NAME` would, the toy model's defaults), then, for the base model and every erased one,
on star prompts the erase never trained on:

- the star rate of plain images (the toy metric's "appears" for `star`, by the toy classifier);
- the star rate under each attack (`recare eval --attack`'s core: one adversarial prompt per
  prompt and seed, one image each, same seeds), and the attack's time per prompt; for
  unlearndiffatk the targets are the base model's images, for concept-inversion the images are
  the base model's "a star" images (one set for every model: ESD's runs have no training images);
- a grid picture: for the first prompt, per model, plain and under each attack, same seeds.

Prints a markdown table and writes it, results.json and grid.png to --out.

    python bench/toy_robustness.py                        # every registered method + recare --prefix-steps 10
    python bench/toy_robustness.py --methods esd recare:prefix_steps=10 --erase-set iterations=100
    python bench/toy_robustness.py --phase erase --methods esd    # only erase (to erase in parallel)
    python bench/toy_robustness.py --methods --run esd=bench-runs/frontier/esd-s42 ...   # attack finished runs

A method is a registered erase method's name, optionally with EraseRequest fields:
`recare:prefix_steps=10`. Runs in --runs are reused when rerun with the same settings, and so are
attacks and images in --out.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

PROMPTS = ("a yellow star on grass", "a white star in the sky", "a picture of a red star", "a blue star at night")
ATTACKS = ("unlearndiffatk", "concept-inversion")
CONCEPT = "star"


def parse_fields(items: list[str], what: str) -> dict:
    fields = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"{what} '{item}' is not FIELD=VALUE")
        fields[key.strip()] = json.loads(value) if value.strip()[:1] in "0123456789-[{tf\"" else value
    return fields


def parse_method(spec: str) -> tuple[str, dict]:
    name, _, extra = spec.partition(":")
    return name, parse_fields([e for e in extra.split(",") if e], "method field")


def label_of(spec: str) -> str:
    return spec.replace(":", "-").replace(",", "-").replace("=", "")


def default_methods() -> list[str]:
    from recare_cli.plugins import registry

    return sorted(registry().methods) + ["recare:prefix_steps=10"]


def erase(spec: str, extra: dict, runs: Path, reporter) -> tuple[Path, float]:
    """(run directory, seconds the erase's stages took when they ran)."""
    from recare_cli.erase.run import EraseRequest
    from recare_cli.models import Runtime
    from recare_cli.plugins import registry
    from recare_cli.presets import with_model_defaults

    name, fields = parse_method(spec)
    fields = {**extra, **fields}
    request = with_model_defaults(EraseRequest(concepts=[CONCEPT], method=name, output_dir=runs / label_of(f"{CONCEPT}-{spec}"),
                                               **fields), "toy", set(fields))
    result = registry().method(name).run(request, Runtime("toy", device="cpu"), reporter)
    stages = json.loads((result.run_dir / "recare-run.json").read_text())["stages"]
    return result.run_dir, sum(v.get("seconds", 0) for v in stages.values())


def finished_run(item: str) -> tuple[str, Path, float]:
    """LABEL=DIR of a finished erase run: (label, run directory, seconds its stages took)."""
    label, sep, folder = item.partition("=")
    manifest = Path(folder) / "recare-run.json"
    if not sep or not manifest.is_file() or json.loads(manifest.read_text()).get("status") != "complete":
        raise SystemExit(f"--run '{item}' is not LABEL=DIR of a finished erase run")
    stages = json.loads(manifest.read_text())["stages"]
    return label, Path(folder), sum(v.get("seconds", 0) for v in stages.values())


def star_rate(ctx) -> float:
    """Mean over prompts of the toy metric's star rate (the classifier's shape head says star)."""
    from recare_cli.metrics import toy

    rows = [r for r in toy.run(ctx) if not r.detail and r.key.get("concept") == CONCEPT]
    return sum(r.values["appears_pct"] for r in rows) / len(rows)


def seconds_per_prompt(out: Path, attacked: str) -> float:
    from recare_cli.attacks.run import prompts_file, read_prompts_csv

    rows = read_prompts_csv(prompts_file(out, attacked))
    return sum(float(r["seconds"]) for r in rows) / len(rows)


def grid(rows: list[tuple[str, list[Path]]], path: Path, scale: int = 3) -> None:
    """One row of images per (label, images), label on the left."""
    from PIL import Image, ImageDraw

    with Image.open(rows[0][1][0]) as first:
        size = first.width * scale
    label_width = int(max(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(label) for label, _ in rows)) + 12
    columns = max(len(images) for _, images in rows)
    canvas = Image.new("RGB", (label_width + columns * (size + 4), len(rows) * (size + 4)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (label, images) in enumerate(rows):
        top = r * (size + 4)
        draw.text((4, top + size // 2 - 6), label, fill="black")
        for c, image_path in enumerate(images):
            with Image.open(image_path) as image:
                canvas.paste(image.convert("RGB").resize((size, size), Image.Resampling.NEAREST),
                             (label_width + c * (size + 4), top))
    canvas.save(path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="*", default=None, help="erase methods (default: every registered one "
                        "and recare:prefix_steps=10); NAME or NAME:field=value,...")
    parser.add_argument("--run", action="append", default=[], help="LABEL=DIR: also attack this finished erase "
                        "run (e.g. bench/toy_frontier.py's), without erasing again")
    parser.add_argument("--erase-set", nargs="*", default=[], help="EraseRequest fields for every erase, e.g. iterations=100")
    parser.add_argument("--attacks", nargs="+", default=list(ATTACKS))
    parser.add_argument("--attack-steps", nargs="*", default=[], help="ATTACK=STEPS (default: each attack's own)")
    parser.add_argument("--prompts", nargs="+", default=list(PROMPTS), help="star prompts the erase never trained on")
    parser.add_argument("--samples", type=int, default=4, help="seeds per prompt (seed 0, 1, ...)")
    parser.add_argument("--steps", type=int, default=25, help="denoising steps per image")
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--concept-images", type=int, default=16, help="base-model images of 'a star' for concept-inversion")
    parser.add_argument("--phase", choices=("all", "erase"), default="all")
    parser.add_argument("--runs", type=Path, default=Path("runs/robustness/runs"))
    parser.add_argument("--out", type=Path, default=Path("runs/robustness"))
    args = parser.parse_args(argv)

    from recare_cli.attacks import AttackSettings, ConceptSource
    from recare_cli.attacks.run import AttackPlan, attacked_label, run_attack
    from recare_cli.evaluate import EvalContext, ModelUnderTest
    from recare_cli.generate import GenerateSettings, PromptRow, generate
    from recare_cli.models import Runtime
    from recare_cli.output import HUMAN, Reporter
    from recare_cli.plugins import registry
    from recare_cli.presets import plan_concept

    reporter = Reporter(HUMAN)
    methods = default_methods() if args.methods is None else args.methods
    unknown = [m for m in methods if parse_method(m)[0] not in registry().methods]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; registered: {', '.join(sorted(registry().methods))}")
    extra = parse_fields(args.erase_set, "--erase-set")
    steps = {k: int(v) for k, v in parse_fields(args.attack_steps, "--attack-steps").items()}

    runs = {}
    for spec in methods:
        reporter.info(f"[bold]erase[/] {CONCEPT}: {spec}")
        runs[spec] = erase(spec, extra, args.runs, reporter)
    for item in args.run:
        label, run_dir, seconds = finished_run(item)
        runs[label] = (run_dir, seconds)
    if args.phase == "erase":
        return 0

    runtime = Runtime("toy", device="cpu")
    generation = GenerateSettings(steps=args.steps, guidance=args.guidance)
    prompts = [PromptRow(p) for p in args.prompts]
    cache: dict = {}

    def context(label: str, unet: str | None) -> EvalContext:
        return EvalContext(ModelUnderTest(label, runtime, unet), {"target": CONCEPT}, reporter,
                           images_dir=args.out / "images" / label, prompts=prompts, num_images=args.samples, seed=0,
                           generation=generation, cache=cache)

    base = context("base", None)
    contexts = [base] + [context(label_of(spec), str(run_dir)) for spec, (run_dir, _) in runs.items()]
    concept_dir = args.out / "concept-images"
    generate([PromptRow("a star")], concept_dir, runtime, generation, args.concept_images, 1000, reporter)
    plan = plan_concept(CONCEPT)
    concept = ConceptSource((CONCEPT,), tuple(sorted(concept_dir.glob("*.png"))), plan.templates, plan.initializer_token)

    results = {}
    for ctx in contexts:
        entry = results.setdefault(ctx.label, {"plain": star_rate(ctx), "attacks": {}})
        if ctx.label != "base":
            entry["erase_seconds"] = round(runs[next(s for s in runs if label_of(s) == ctx.label)][1], 1)
    attacked_images = {}
    for name in args.attacks:
        attack_plan = AttackPlan(registry().attack(name), AttackSettings(steps=steps.get(name)), concept)
        for ctx in contexts:
            started = time.perf_counter()
            under_attack = run_attack(attack_plan, ctx, base, args.out, reporter)
            results[ctx.label]["attacks"][name] = {
                "star_rate": star_rate(under_attack),
                "seconds_per_prompt": round(seconds_per_prompt(args.out, attacked_label(ctx.label, name)), 2),
                "wall_seconds": round(time.perf_counter() - started, 1)}
            attacked_images[(ctx.label, name)] = under_attack.images()[: args.samples]

    rows = []
    for ctx in contexts:
        rows.append((ctx.label, [i.path for i in ctx.images()[: args.samples]]))
        rows += [(attacked_label(ctx.label, name), [i.path for i in attacked_images[(ctx.label, name)]])
                 for name in args.attacks]
    grid(rows, args.out / "grid.png")

    report = {"concept": CONCEPT, "prompts": args.prompts, "samples": args.samples, "steps": args.steps,
              "guidance": args.guidance, "attack_steps": steps, "erase_set": extra, "methods": methods, "runs": args.run,
              "machine": machine(), "results": results}
    table = markdown(report)
    print(table)
    (args.out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "results.md").write_text(table + "\n")
    return 0


def machine() -> str:
    import os

    return f"{platform.machine()}, {os.cpu_count()} CPUs, torch {__import__('torch').__version__}"


def markdown(report: dict) -> str:
    attacks = list(next(iter(report["results"].values()))["attacks"])
    lines = [f"Star rate (toy classifier) on {len(report['prompts'])} star prompts x {report['samples']} seeds, "
             f"{report['steps']} steps, guidance {report['guidance']}; attack time per prompt on {report['machine']}", "",
             "| model | plain | " + " | ".join(f"under {a} | {a} s/prompt" for a in attacks) + " | erase time |",
             "|---|---|" + "---|---|" * len(attacks) + "---|"]
    for label, entry in report["results"].items():
        cells = [f"{entry['plain']:.0f}%"]
        for a in attacks:
            cells += [f"{entry['attacks'][a]['star_rate']:.0f}%", f"{entry['attacks'][a]['seconds_per_prompt']:.1f}"]
        erase_time = f"{entry['erase_seconds']:.0f} s" if "erase_seconds" in entry else "–"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {erase_time} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
