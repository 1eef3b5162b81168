"""The sweep behind ReCARE's toy defaults, with night in the CARE set (a benchmark, not a test).

For both ReCARE variants (exact, `--prefix-steps 10`) and three training seeds, the robust stage's
learning rate (1e-4, 2e-4) times its iterations (100, 200, 300: the periodic checkpoints of one
300-iteration run) is measured as bench/toy_frontier.py measures (its prompts, its summary, its
goals), with more images per prompt. Stage 1, the inversions, the images and the CARE set of a
seed are trained once (the frontier's default runs where they exist) and shared by its robust
runs, as in bench/toy_lr_sweep.py. `--num-images` adds other training-image counts at the default
rate (each a new run per seed and variant, its first erase taken from the seed's own run, which no
image reaches). Everything is kept under --runs and reused, so it resumes:

    python bench/toy_defaults_sweep.py --phase train            # one process: the runs in order
    python bench/toy_defaults_sweep.py --phase measure --until 15:10   # beside it: measures what is trained
    python bench/toy_defaults_sweep.py --phase report           # per setting: every seed, and the goals
    python bench/toy_defaults_sweep.py --phase train --num-images 64,128,32   # and the same for measure/report
    python bench/toy_defaults_sweep.py --phase measure --num-images 128 --defaults-only --samples 32   # the defaults, closer
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import frontier_summary  # bench/, the script's own folder
import toy_frontier as tf
from frontier_measure import Measuring

VARIANTS = ("p10", "exact")
SEEDS = (42, 43, 44)
LRS = (1e-4, 2e-4)
CHECKPOINTS = (100, 200, 300)
DEFAULT_LR = 1e-4
BASE_IMAGES = tf.FIRST_IMAGES  # the seeds' own runs; other counts are swept at the default rate only


def base_run(variant: str, seed: int) -> str:
    return tf.recare_run(variant, seed, BASE_IMAGES)


def robust_run(runs: Path, variant: str, seed: int, lr: float) -> str:
    """The run holding this setting's robust checkpoints: the seed's own run at the default rate,
    unless it was trained (by the frontier) without keeping them."""
    own = runs / base_run(variant, seed)
    if lr == DEFAULT_LR and (not tf.finished(own) or (own / "snapshots").is_dir()):
        return own.name
    return f"sweep-{variant}-s{seed}-lr{lr:g}"


def train_all(runs: Path, reporter, counts: list[int]) -> None:
    # Cheapest first: the robust-only runs of the seeds already trained, then the new seed.
    for seed in SEEDS:
        for variant in VARIANTS:
            tf.train(base_run(variant, seed), tf.recare_settings(variant, BASE_IMAGES) | {"seed": seed}, runs, reporter,
                     snapshot_stage="robust")
            for lr in LRS:
                name = robust_run(runs, variant, seed, lr)
                if name != base_run(variant, seed):
                    tf.train(name, {}, runs, reporter, snapshot_stage="robust", robust_from=base_run(variant, seed), robust_lr=lr)
    # Another image count changes the images, the CARE set and everything trained on them; the
    # first erase reads none of these and is taken from the seed's own run.
    for count in (c for c in counts if c != BASE_IMAGES):
        for seed in SEEDS:
            for variant in VARIANTS:
                tf.train(tf.recare_run(variant, seed, count), tf.recare_settings(variant, count) | {"seed": seed}, runs,
                         reporter, snapshot_stage="robust", stage1_from=base_run(variant, seed))


def models(runs: Path, counts: list[int], defaults_only: bool = False) -> list[dict]:
    """Every setting's model, in the order they are measured: defaults (300 it., 1e-4) first.

    `defaults_only`: the base model and today's toy defaults (300 it., 1e-4, the toy's image count).
    """
    from recare_cli.presets import MODEL_DEFAULTS

    out = [{"name": "base", "run": None}]
    settings = [(v, s, lr, it, BASE_IMAGES) for v in VARIANTS for s in SEEDS for lr in LRS for it in CHECKPOINTS]
    settings += [(v, s, DEFAULT_LR, it, n) for n in counts if n != BASE_IMAGES
                 for v in VARIANTS for s in SEEDS for it in CHECKPOINTS]
    order = sorted(settings, key=lambda k: (k[2] != DEFAULT_LR or k[3] != 300, k[4], k[1], k[2], -k[3]))
    for variant, seed, lr, it, count in order:
        if count == BASE_IMAGES:
            run, tokens, name = runs / robust_run(runs, variant, seed, lr), runs / base_run(variant, seed), f"{variant}-s{seed}"
        else:
            run = tokens = runs / tf.recare_run(variant, seed, count)
            name = f"{variant}-s{seed}-img{count}"
        out.append({"name": f"{name}-lr{lr:g}-it{it}", "variant": variant, "seed": seed, "lr": lr, "images": count,
                    "iterations": it, "run": run, "tokens": tokens,
                    "snapshot": None if it == 300 else run / "snapshots" / f"robust-{it}.safetensors"})
    if defaults_only:
        toy_images = MODEL_DEFAULTS["toy"]["num_images"]
        out = [m for m in out if m["run"] is None or (m["lr"] == DEFAULT_LR and m["iterations"] == 300
                                                      and m["images"] == toy_images)]
    return out


def measurements_dir(args) -> Path:
    """8 images a prompt: the sweep's own folder; other sample sizes keep theirs apart."""
    return args.runs / ("sweep-measurements" if args.samples == 8 else f"sweep-measurements-n{args.samples}")


def measure_all(args, reporter) -> None:
    measuring = Measuring.load()
    out = measurements_dir(args)
    out.mkdir(exist_ok=True)
    while True:
        if tf.past(args.until):
            return
        # A snapshot exists mid-run; its tokens and CARE set only once the seed's own run is complete.
        ready = [m for m in models(args.runs, args.num_images, args.defaults_only) if tf.available(m) and (m["run"] is None or tf.finished(m["tokens"]))]
        model = next((m for m in ready if tf.claim(out, m["name"])), None)
        if model is None:
            if not tf.wait_or_stop(args.until):
                return
            continue
        reporter.info(f"measure {model['name']}")
        # Each seed's own CARE set decides which words count as CARE concepts for its models.
        care = tf.care_words_of(model["tokens"]) if model["run"] else tf.care_words(args.runs, BASE_IMAGES)
        tokens_file = Path(model.get("tokens") or args.runs / base_run("p10", 42)) / "tokens.safetensors"
        measuring.measure(model, care, tokens_file, args, out, care=care)


def goals(point: dict) -> dict[str, bool]:
    """Issue #19's goals for one model (each kept figure: [sum over base, lowest prompt])."""
    care, unrelated, night = point["care_kept"], point["unrelated_kept"], point["night_with_target"]
    night_own = point["night_without_target"]
    return {
        "target <= 10% (common and rare)": frontier_summary.target(point) <= 10.0,
        "CARE >= 80% every prompt, mean >= 90%": care is not None and care[1] >= 80.0 and care[0] >= 90.0,
        "others >= 70% every prompt, mean >= 90%": unrelated is not None and unrelated[1] >= 70.0 and unrelated[0] >= 90.0,
        "night >= 80% every prompt": all(v is None or v[1] >= 80.0 for v in (night, night_own)),
    }


def report(args) -> str:
    from recare_cli.presets import MODEL_DEFAULTS

    toy_images = MODEL_DEFAULTS["toy"]["num_images"]  # in bold: today's defaults
    out = measurements_dir(args)
    entries = {m["name"]: (m, json.loads((out / f"{m['name']}.json").read_text()))
               for m in models(args.runs, args.num_images, args.defaults_only) if (out / f"{m['name']}.json").is_file()}
    base = entries.pop("base")[1]
    rows = {}
    for name, (model, entry) in entries.items():
        point = frontier_summary.summarise(entry, base, entry["care"])
        rows.setdefault((model["variant"], model["images"], model["lr"], model["iterations"]), []).append((model["seed"], point))

    def pair(v):
        return "–" if v is None else f"{v[0]:.0f}% ({v[1]:.0f}%)"

    lines = [f"{args.samples} images per prompt, {args.steps} DDIM steps, guidance {args.guidance}. "
             "Kept: sum of rates over the base's (lowest single prompt). Goals met: of the four goals of "
             "docs/frontier.md, per seed.", "",
             "| variant | images | stage-2 lr | robust it. | seed | target common | target rare | CARE kept | unrelated kept | "
             "night (own) | night (with star) | goals met |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    summary = []
    for (variant, count, lr, it), points in sorted(rows.items()):
        met_all = 0
        for seed, p in sorted(points):
            met = goals(p)
            met_all += all(met.values())
            label = "**" if (lr == DEFAULT_LR and it == 300 and count == toy_images) else ""
            lines.append(f"| {variant} | {label}{count}{label} | {label}{lr:g}{label} | {label}{it}{label} | {seed} | {p['target_common']:.0f}% | "
                         f"{p['target_rare']:.0f}% | {pair(p['care_kept'])} | {pair(p['unrelated_kept'])} | "
                         f"{pair(p['night_without_target'])} | {pair(p['night_with_target'])} | "
                         f"{sum(met.values())}/4 |")
        mean = {k: sum(p[k][0] if isinstance(p[k], list) else p[k] for _, p in points) / len(points)
                for k in ("target_common", "target_rare", "care_kept", "unrelated_kept")}
        summary.append(f"| {variant} | {count} | {lr:g} | {it} | {len(points)} | {mean['target_common']:.0f}% | {mean['target_rare']:.0f}% | "
                       f"{mean['care_kept']:.0f}% | {mean['unrelated_kept']:.0f}% | {met_all} of {len(points)} |")
    lines += ["", "Means over the seeds measured:", "",
              "| variant | images | stage-2 lr | robust it. | seeds | target common | target rare | CARE kept | unrelated kept | "
              "seeds meeting every goal |", "|---|---|---|---|---|---|---|---|---|---|"] + summary
    # Each run's own CARE set decides which words count as CARE concepts in its rows.
    care_sets = {(m["images"], m["variant"], m["seed"]): ", ".join(e["care"]) for m, e in entries.values()}
    lines += ["", "The CARE set each seed's run built:", "", "| images | variant | seed | CARE set |", "|---|---|---|---|"]
    lines += [f"| {n} | {v} | {seed} | {words} |" for (n, v, seed), words in sorted(care_sets.items())]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, default=Path("bench-runs/frontier"), help="erase runs (the frontier's are reused)")
    parser.add_argument("--phase", choices=("train", "measure", "report"), required=True)
    parser.add_argument("--samples", type=int, default=8, help="images per prompt (the frontier: 4)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--num-images", default=str(BASE_IMAGES),
                        help="comma-separated training-image counts (64: the seeds' own runs); others at the default rate")
    parser.add_argument("--until", help="measure: stop starting new measurements at this UTC time (HH:MM)")
    parser.add_argument("--defaults-only", action="store_true",
                        help="measure/report only the base model and today's toy defaults (e.g. with more --samples)")
    args = parser.parse_args(argv)
    args.num_images = [int(n) for n in args.num_images.split(",")]
    import torch

    from recare_cli.output import HUMAN, Reporter

    torch.set_num_threads(1)
    reporter = Reporter(HUMAN)
    args.runs.mkdir(parents=True, exist_ok=True)
    if args.phase == "train":
        train_all(args.runs, reporter, args.num_images)
    if args.phase == "measure":
        measure_all(args, reporter)
    if args.phase == "report":
        print(report(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
