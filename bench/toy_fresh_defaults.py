"""The toy defaults from fresh runs, over three seeds (a benchmark, not a test).

For both ReCARE variants (exact, `--prefix-steps 10`) and seeds 42-44: the toy default run,
trained from scratch as `recare erase --model toy --concept star [--prefix-steps 10] --seed S`
trains it (bench/toy_defaults_sweep.py's 128-image runs took their first erase from the seed's
64-image run), measured as bench/toy_frontier.py measures (its prompts, its summary, issue 19's
goals) with --samples images a prompt. `--stage2-lrs` adds robust-only runs at other rates, which
reuse the default run's stage 1, images and CARE set; `--stage1-lrs` adds whole runs from scratch at
other stage-1 rates (`recare erase ... --stage1-lr R`). Everything is kept under --runs and reused,
so it resumes:

    python bench/toy_fresh_defaults.py --phase train --variant p10 &     # one process per variant
    python bench/toy_fresh_defaults.py --phase train --variant exact &
    python bench/toy_fresh_defaults.py --phase measure --until 13:30      # beside them, one or two
    python bench/toy_fresh_defaults.py --phase report
    python bench/toy_fresh_defaults.py --phase train --variant p10 --stage2-lrs 2e-4   # and measure/report with it
    python bench/toy_fresh_defaults.py --phase train --variant exact --stage1-lrs 1e-4 --no-defaults   # likewise

Until 2026-12-01 it was bench/toy_care_context.py (commit ed9746f), which also trained each run
with `--care-context`, an option that was measured there and removed (docs/frontier.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import frontier_summary  # bench/, the script's own folder
import toy_frontier as tf
from toy_defaults_sweep import goals

VARIANTS = ("p10", "exact")
SEEDS = (42, 43, 44)


def rate_label(rate: float | None) -> str:
    return f"{rate:g}" if rate else "default"


def run_name(variant: str, seed: int, lr: float | None = None, stage1_lr: float | None = None) -> str:
    """`lr`: another robust-stage rate than the toy default (a robust-only run from the default run);
    `stage1_lr`: another stage-1 rate (a whole run from scratch)."""
    return f"default-{variant}-s{seed}" + (f"-lr{lr:g}" if lr else "") + (f"-s1lr{stage1_lr:g}" if stage1_lr else "")


def train_variant(runs: Path, variant: str, reporter, seeds: tuple[int, ...] = SEEDS, lrs: tuple[float, ...] = (),
                  stage1_lrs: tuple[float, ...] = (), defaults: bool = True) -> None:
    from recare_cli.presets import MODEL_DEFAULTS

    images = MODEL_DEFAULTS["toy"]["num_images"]
    for seed in seeds:
        default = run_name(variant, seed)
        if defaults or lrs:
            tf.train(default, tf.recare_settings(variant, images) | {"seed": seed}, runs, reporter)
        for lr in lrs:
            tf.train(run_name(variant, seed, lr), {}, runs, reporter, robust_from=default, robust_lr=lr)
        for stage1_lr in stage1_lrs:
            tf.train(run_name(variant, seed, stage1_lr=stage1_lr),
                     tf.recare_settings(variant, images) | {"seed": seed, "stage1_lr": stage1_lr}, runs, reporter)


def models(runs: Path, lrs: tuple[float, ...] = (), stage1_lrs: tuple[float, ...] = ()) -> list[dict]:
    out = [{"name": "base", "run": None}]
    rates = [(lr, None) for lr in (None, *lrs)] + [(None, stage1_lr) for stage1_lr in stage1_lrs]
    for lr, stage1_lr in rates:
        for seed in SEEDS:
            for variant in VARIANTS:
                run = runs / run_name(variant, seed, lr, stage1_lr)
                out.append({"name": run.name, "variant": variant, "seed": seed, "run": run, "lr": lr, "stage1_lr": stage1_lr})
    return out


def measurements_dir(args) -> Path:
    return args.runs / f"measurements-n{args.samples}"


def measure_all(args, reporter) -> None:
    from frontier_measure import Measuring

    measuring = Measuring.load()
    out = measurements_dir(args)
    out.mkdir(exist_ok=True)
    # Each run's own CARE set decides which words count as CARE concepts; the base model is measured
    # with the first finished run's (summarise regroups by each run's own set), and its tokens.
    while not tf.past(args.until):
        every = models(args.runs, args.stage2_lrs, args.stage1_lrs)
        first = next((m["run"] for m in every[1:] if tf.finished(m["run"])), None)
        ready = [m for m in every if (m["run"] or first) and tf.finished(m["run"] or first)]
        model = next((m for m in ready if tf.claim(out, m["name"])), None)
        if model is None:
            if not tf.wait_or_stop(args.until):
                return
            continue
        reporter.info(f"measure {model['name']}")
        run = model["run"] or first
        care = tf.care_words_of(run)
        measuring.measure(model, care, run / "tokens.safetensors", args, out, care=care, train_seconds=tf.seconds(model))


def report(args) -> str:
    out = measurements_dir(args)
    entries = {m["name"]: (m, json.loads((out / f"{m['name']}.json").read_text()))
               for m in models(args.runs, args.stage2_lrs, args.stage1_lrs) if (out / f"{m['name']}.json").is_file()}
    base = entries.pop("base")[1]

    def pair(v):
        return "–" if v is None else f"{v[0]:.0f}% ({v[1]:.0f}%)"

    lines = [f"{args.samples} images per prompt, {args.steps} DDIM steps, guidance {args.guidance}. Kept: sum of "
             "rates over the base's (lowest single prompt); CARE with star: the CARE concepts on the prompts that "
             "name the star. Goals met: of issue 19's four goals (docs/frontier.md). Stage-1/2 lr: default = the toy's.", "",
             "| variant | stage-1 lr | stage-2 lr | seed | target common | target rare | CARE kept | CARE with star | unrelated kept | "
             "night (own) | night (with star) | adversarial | training | goals met |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    groups: dict = {}
    for model, entry in sorted(entries.values(),
                               key=lambda e: (e[0]["variant"], e[0]["stage1_lr"] or 0, e[0]["lr"] or 0, e[0]["seed"])):
        p = frontier_summary.summarise(entry, base, entry["care"])
        met = goals(p)
        seconds = entry.get("train_seconds")
        rate, stage1 = rate_label(model["lr"]), rate_label(model["stage1_lr"])
        lines.append(f"| {model['variant']} | {stage1} | {rate} | {model['seed']} | {p['target_common']:.0f}% | "
                     f"{p['target_rare']:.0f}% | {pair(p['care_kept'])} | {pair(p['care_kept_with_target'])} | "
                     f"{pair(p['unrelated_kept'])} | {pair(p['night_without_target'])} | {pair(p['night_with_target'])} | "
                     f"{p['adversarial']:.0f}% | {'–' if seconds is None else f'{seconds:.0f} s'} | {sum(met.values())}/4 |")
        groups.setdefault((model["variant"], stage1, rate), []).append((p, met))
    lines += ["", "Means over the seeds measured:", "",
              "| variant | stage-1 lr | stage-2 lr | seeds | target common | target rare | CARE kept | CARE with star | "
              "unrelated kept | goals met (of 4 a seed) | seeds meeting every goal |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for (variant, stage1, rate), points in sorted(groups.items()):
        n = len(points)

        def mean(figure):
            return sum(figure(p) for p, _ in points) / n

        lines.append(f"| {variant} | {stage1} | {rate} | {n} | {mean(lambda p: p['target_common']):.0f}% | "
                     f"{mean(lambda p: p['target_rare']):.0f}% | {mean(lambda p: p['care_kept'][0]):.0f}% | "
                     f"{mean(lambda p: p['care_kept_with_target'][0]):.0f}% | {mean(lambda p: p['unrelated_kept'][0]):.0f}% | "
                     f"{sum(sum(met.values()) for _, met in points)} of {4 * n} | "
                     f"{sum(all(met.values()) for _, met in points)} of {n} |")
    # Runs at another stage-1 rate build their own CARE set, from images made with the same seed.
    care_sets = {(m["variant"], rate_label(m["stage1_lr"]), m["seed"]): ", ".join(e["care"])
                 for m, e in entries.values() if not m["lr"]}
    lines += ["", "CARE sets (a seed's runs at other stage-2 rates share its default run's):", "",
              "| variant | stage-1 lr | seed | CARE set |", "|---|---|---|---|"]
    lines += [f"| {v} | {s1} | {seed} | {words} |" for (v, s1, seed), words in sorted(care_sets.items())]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, default=Path("bench-runs/fresh-defaults"), help="erase runs and measurements")
    parser.add_argument("--phase", choices=("train", "measure", "report"), required=True)
    parser.add_argument("--variant", choices=VARIANTS, help="train: this variant only (default: both, in turn)")
    parser.add_argument("--stage2-lrs", default="", help="robust-stage rates besides the toy default, comma-separated")
    parser.add_argument("--stage1-lrs", default="", help="stage-1 rates besides the toy default, comma-separated")
    parser.add_argument("--no-defaults", dest="defaults", action="store_false",
                        help="train: only the runs at other stage-1 rates (those at other stage-2 rates need the default run)")
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)), help="train: these seeds only (comma-separated)")
    parser.add_argument("--samples", type=int, default=16, help="images per prompt")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--until", help="measure: stop starting new measurements at this UTC time (HH:MM)")
    args = parser.parse_args(argv)
    args.stage2_lrs = tuple(float(x) for x in args.stage2_lrs.split(",") if x)
    args.stage1_lrs = tuple(float(x) for x in args.stage1_lrs.split(",") if x)
    import torch

    from recare_cli.output import HUMAN, Reporter

    torch.set_num_threads(1)
    reporter = Reporter(HUMAN)
    args.runs.mkdir(parents=True, exist_ok=True)
    if args.phase == "train":
        for variant in [args.variant] if args.variant else VARIANTS:
            train_variant(args.runs, variant, reporter, tuple(int(x) for x in args.seeds.split(",")), args.stage2_lrs,
                          args.stage1_lrs, args.defaults)
    if args.phase == "measure":
        measure_all(args, reporter)
    if args.phase == "report":
        print(report(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
