"""Erasure against what else goes, per method, on the toy world (a benchmark, not a test).

Erases `star` from `--model toy` with esd, uce, uce --preserve careset, recare (exact) and recare
--prefix-steps 10, each over a range of strengths, and measures every model with the toy
classifier on prompts no erase trained on (docs/frontier.md explains the groups):

- target rate on common-context prompts (colours, backgrounds, styles named in >= 10% of the toy
  world's captions of a star) and on rare-context ones (< 10%: derived from the captions here);
- each CARE concept's rate on its own prompts and on target prompts that name it, as % of base;
- every other concept's rate on its own prompts as % of base; night (the concept star co-occurs
  with most) on its own and with the target, wherever the CARE set put it;
- the ReCARE default's adversarial tokens' target rate, and training time.

The prompts and the measuring live in bench/frontier_measure.py, the figures, the matched-erasure
table's reading and the picture in bench/frontier_summary.py; this script trains, orders and reports.

Strengths: recare, the stage-2 lr (stage 1 and the inversions shared: bench/toy_lr_sweep.py) and
the robust stage's own checkpoints; esd, the iterations (its periodic checkpoints) and lr; uce, the
erase scale and lambda. Every erase run and measurement is kept under --runs and reused, so the
script resumes; phases train (a, b, c: run them side by side), measure and report:

    python bench/toy_frontier.py --phase a & python bench/toy_frontier.py --phase c &
    python bench/toy_frontier.py --phase measure --until 08:50
    python bench/toy_frontier.py --phase report      # table (markdown) + frontier.png
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from frontier_measure import CONCEPT, Measuring, context_frequencies  # bench/, the script's own folder
from frontier_summary import MATCHED, at_matched_erasure, plot, summarise

UCE_SCALES = (1.0, 0.5, 2.0, 4.0)
# ReCARE's runs are named by their training-image count (--num-images). The comparison was first
# measured with the toy's default of that day, 64 images; those runs and measurements keep their
# first names, which bench/toy_defaults_sweep.py reuses as its seeds' own runs.
FIRST_IMAGES = 64
FIRST_SAMPLES = 4  # images per prompt of the first measurement (the default)


def recare_settings(variant: str, images: int) -> dict:
    """The erase settings of a ReCARE variant: "exact" or "p10" (`--prefix-steps 10`)."""
    return {"method": "recare", "num_images": images} | ({"prefix_steps": 10} if variant == "p10" else {})


def recare_run(variant: str, seed: int, images: int) -> str:
    return f"{'recare' if images == FIRST_IMAGES else f'img{images}'}-{variant}-s{seed}"


def uce_careset_run(scale: float, images: int) -> str:
    """UCE with the CARE set of the ReCARE default trained with `images` images."""
    return f"{'' if images == FIRST_IMAGES else f'img{images}-'}uce-careset-s{scale:g}"


def measurements_dir(runs: Path, images: int | None, samples: int) -> Path:
    """Where a model's measurement with `samples` images a prompt lives: the models that no training
    image reaches (base, esd, plain uce: `images` None) share the first image count's, whatever the
    image count being compared."""
    name = "measurements" if images in (None, FIRST_IMAGES) else f"measurements-img{images}"
    return runs / (name if samples == FIRST_SAMPLES else f"{name}-n{samples}")


class SnapshotReporter:
    """Wraps a Reporter; copies the trained weights of every periodic checkpoint of `stage`."""

    def __init__(self, inner, run_dir: Path, stage: str):
        self.inner, self.run_dir, self.stage = inner, run_dir, stage

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def event(self, kind, **data):
        self.inner.event(kind, **data)
        if kind == "checkpoint" and data.get("stage") == self.stage:
            from safetensors.torch import load_file, save_file

            from recare_cli.erase.loop import CHECKPOINT

            saved = load_file(str(self.run_dir / CHECKPOINT))  # tensors only: checkpoints hold no pickle
            params = {k[len("param/"):]: v for k, v in saved.items() if k.startswith("param/")}
            out = self.run_dir / "snapshots"
            out.mkdir(exist_ok=True)
            save_file(params, str(out / f"{self.stage}-{data['step']}.safetensors"))


def finished(run_dir: Path) -> bool:
    path = run_dir / "recare-run.json"
    return path.is_file() and json.loads(path.read_text()).get("status") == "complete"


def train(name: str, settings: dict, runs: Path, reporter, snapshot_stage: str | None = None,
          checkpoint_every: int = 100, robust_from: str | None = None, robust_lr: float | None = None,
          stage1_from: str | None = None):
    from recare_cli.erase.run import EraseRequest, run_erase
    from recare_cli.models import Runtime
    from recare_cli.presets import with_model_defaults

    run_dir = runs / name
    if finished(run_dir):
        return run_dir
    runtime = Runtime("toy", device="cpu")
    import toy_lr_sweep

    if robust_from is not None:
        @dataclass
        class Ref:
            run_dir: Path
            stages: dict = field(default_factory=dict)

        ref_dir = runs / robust_from
        ref = Ref(ref_dir, json.loads((ref_dir / "recare-run.json").read_text())["stages"])
        from dataclasses import replace
        # Straight into its own directory: two processes may seed robust-only runs at once.
        request = toy_lr_sweep.robust_only_request(ref, robust_lr, runs, output_dir=run_dir)
        request = replace(request, checkpoint_every=checkpoint_every)
    else:
        request = with_model_defaults(EraseRequest(concepts=[CONCEPT], output_dir=run_dir, checkpoint_every=checkpoint_every,
                                                   **settings), "toy", set(settings))
        if stage1_from is not None and not run_dir.exists():  # the first erase reads no image or CARE set
            toy_lr_sweep.seed_run_dir(request, runs / stage1_from, runtime, ["erase-0"])
    wrapped = SnapshotReporter(reporter, run_dir, snapshot_stage) if snapshot_stage else reporter
    started = time.perf_counter()
    run_erase(request, runtime, wrapped)
    reporter.info(f"trained {name} in {time.perf_counter() - started:.0f} s")
    return run_dir


# --- the models measured -------------------------------------------------------------------------

def models(runs: Path, images: int) -> list[dict]:
    """Every model of the comparison, most important first: method, setting, where its UNet is.

    `run`: an erase run directory (its unet.safetensors); `snapshot`: trained weights saved at a
    periodic checkpoint of that run (the base UNet plus those weights); `tokens`: the run whose
    adversarial tokens are measured (ESD and UCE learn none: the ReCARE default's); `images`: the
    training-image count that reaches the model (None: none does).
    """
    p10, exact = runs / recare_run("p10", 42, images), runs / recare_run("exact", 42, images)
    out = [{"name": "base", "method": "base", "setting": "-", "run": None, "images": None}]

    def add(name, method, setting, run, default=False, snapshot=None, tokens=p10, seed=42):
        reads_images = method.startswith(("recare", "uce --preserve"))
        out.append({"name": name, "method": method, "setting": setting, "run": run, "snapshot": snapshot,
                    "default": default, "tokens": tokens, "seed": seed, "images": images if reads_images else None})

    # In the order measured when time is short: defaults, then the settings that bracket 10%.
    add("recare-p10", "recare --prefix-steps 10", "stage-2 lr 1e-4", p10, default=True)
    add("esd", "esd", "lr 1e-4, 300 it.", runs / "esd-s42", default=True)
    add("uce", "uce", "scale 1, lam 0.5", runs / "uce-s1", default=True)
    add("uce-careset", "uce --preserve careset", "scale 1, lam 0.5", runs / uce_careset_run(1, images), default=True)
    add("recare-exact", "recare (exact)", "stage-2 lr 1e-4", exact, default=True, tokens=exact)
    for scale in (4.0, 2.0):
        add(f"uce-s{scale:g}", "uce", f"scale {scale:g}", runs / f"uce-s{scale:g}")
        add(f"uce-careset-s{scale:g}", "uce --preserve careset", f"scale {scale:g}", runs / uce_careset_run(scale, images))
    add("esd-it150", "esd", "lr 1e-4, 150 it.", runs / "esd-s42", snapshot=runs / "esd-s42" / "snapshots" / "esd-150.safetensors")
    for lr in (2e-4, 5e-5):
        add(f"recare-p10-lr{lr:g}", "recare --prefix-steps 10", f"stage-2 lr {lr:g}", runs / f"{p10.name}-lr{lr:g}")
    for step in (75, 225):
        add(f"esd-it{step}", "esd", f"lr 1e-4, {step} it.", runs / "esd-s42",
            snapshot=runs / "esd-s42" / "snapshots" / f"esd-{step}.safetensors")
    add("recare-p10-lr0.0003", "recare --prefix-steps 10", "stage-2 lr 0.0003", runs / f"{p10.name}-lr0.0003")
    add("uce-s0.5", "uce", "scale 0.5", runs / "uce-s0.5")
    add("uce-careset-s0.5", "uce --preserve careset", "scale 0.5", runs / uce_careset_run(0.5, images))
    add("uce-lam0.1", "uce", "scale 1, lam 0.1", runs / "uce-lam0.1")
    for step in (100, 200):
        add(f"recare-exact-it{step}", "recare (exact)", f"lr 1e-4, {step} robust it.", exact, tokens=exact,
            snapshot=exact / "snapshots" / f"robust-{step}.safetensors")
    add("recare-exact-lr0.0002", "recare (exact)", "stage-2 lr 2e-4", runs / f"{exact.name}-lr0.0002", tokens=exact)
    add("esd-lr0.0003", "esd", "lr 3e-4, 300 it.", runs / "esd-s42-lr0.0003")
    p10_s43, exact_s43 = runs / recare_run("p10", 43, images), runs / recare_run("exact", 43, images)
    add("recare-p10-s43", "recare --prefix-steps 10", "stage-2 lr 1e-4, seed 43", p10_s43, default=True, tokens=p10_s43, seed=43)
    add("esd-s43", "esd", "lr 1e-4, 300 it., seed 43", runs / "esd-s43", default=True, seed=43)
    add("recare-exact-s43", "recare (exact)", "stage-2 lr 1e-4, seed 43", exact_s43, default=True, tokens=exact_s43, seed=43)
    return out


def available(model: dict) -> bool:
    if model["run"] is None:
        return True
    if model.get("snapshot"):
        return Path(model["snapshot"]).is_file()
    return finished(Path(model["run"]))


def seconds(model: dict) -> float | None:
    """Training time from the manifests: every stage of the run (and of the run it shares stage 1 with)."""
    if model["run"] is None:
        return None
    stages = json.loads((Path(model["run"]) / "recare-run.json").read_text()).get("stages", {})
    total = sum(v.get("seconds", 0) for v in stages.values())
    return round(total, 1) if total else None  # a snapshot of a run that has not finished a stage


def edit_uce(runs: Path, images: int, reporter) -> None:
    """The UCE models: seconds each; `--preserve careset` reads the ReCARE default's CARE set."""

    careset = runs / recare_run("p10", 42, images) / "careset.json"
    for scale in UCE_SCALES:
        train(f"uce-s{scale:g}", {"method": "uce", "uce_erase_scale": scale}, runs, reporter)
        if careset.is_file():
            train(uce_careset_run(scale, images), {"method": "uce", "uce_erase_scale": scale, "preserve": ["careset"],
                                                    "careset": careset}, runs, reporter)
    train("uce-lam0.1", {"method": "uce", "uce_lamb": 0.1}, runs, reporter)


def past(until: str | None) -> bool:
    """True once --until (HH:MM, UTC) has passed."""
    import datetime

    return until is not None and datetime.datetime.utcnow().strftime("%H:%M") >= until


def wait_or_stop(until: str | None) -> bool:
    """False once --until has passed or without one; else wait a minute for more runs, True."""
    if until is None or past(until):
        return False
    time.sleep(60)
    return True


def measure_all(args, reporter) -> None:
    """Measure every available model not measured yet, until --until (HH:MM, UTC) or all are done."""
    measuring = Measuring.load()
    while True:
        edit_uce(args.runs, args.num_images, reporter)
        care = care_words(args.runs, args.num_images)
        if past(args.until):
            return
        # One model at a time, the most important one available and not taken by another measuring
        # process (a lock file), so that runs finishing meanwhile are measured in order.
        model = next((m for m in models(args.runs, args.num_images)
                      if care is not None and available(m) and claim(measurements_dir(args.runs, m["images"], args.samples), m["name"])), None)
        if model is None:
            if not wait_or_stop(args.until):
                return
            continue
        reporter.info(f"measure {model['name']}")
        # The adversarial tokens' prompts only for the models that learned them (and base): time is short.
        tokens_file = Path(model.get("tokens") or args.runs / recare_run("p10", 42, args.num_images)) / "tokens.safetensors"
        wants_tokens = model["method"] in ("base",) or model["method"].startswith("recare")
        measuring.measure(model, care, tokens_file if wants_tokens and tokens_file.is_file() else None, args,
                          measurements_dir(args.runs, model["images"], args.samples),
                          train_seconds=seconds(model))


def claim(out: Path, name: str) -> bool:
    """True for the one process that gets to measure `name` (not measured, not being measured).

    The lock file holds the measuring process's id; a lock whose process is gone (killed) is stale.
    """
    import os

    out.mkdir(exist_ok=True)
    if (out / f"{name}.json").is_file():
        return False
    lock = out / f"{name}.lock"
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        try:
            os.kill(int(lock.read_text() or 0), 0)
            return False
        except (ProcessLookupError, ValueError):
            lock.unlink(missing_ok=True)
            return claim(out, name)
    with os.fdopen(fd, "w") as handle:
        handle.write(str(os.getpid()))
    return True


def care_words_of(run: Path) -> list[str] | None:
    import toy_quality

    return toy_quality.care_set_words(run) if (run / "careset.json").is_file() else None


def care_words(runs: Path, images: int) -> list[str] | None:
    return care_words_of(runs / recare_run("p10", 42, images))


def report(args) -> str:
    """The markdown table at matched erasure and per model, and the PNG."""
    care = care_words(args.runs, args.num_images)
    measured = {m["name"]: (m, json.loads(path.read_text())) for m in models(args.runs, args.num_images)
                if (path := measurements_dir(args.runs, m["images"], args.samples) / f"{m['name']}.json").is_file()}
    base = measured.pop("base")[1]
    points = {}
    for name, (model, entry) in measured.items():
        points[name] = {"model": model, "train_seconds": entry["train_seconds"], **summarise(entry, base, care)}

    def pct(value):
        return "–" if value is None else f"{value:.0f}%"

    def pair(value):
        return "–" if value is None else f"{value[0]:.0f}% (min {value[1]:.0f}%)"

    frequencies = context_frequencies(CONCEPT)
    lines = [f"ReCARE trained on {args.num_images} images; {args.samples} images per prompt. CARE set (the ReCARE default's, seed 42): {', '.join(care)}. Context words of `{CONCEPT}` in the toy captions "
             "(% of its captions): " + ", ".join(f"{w} {f:.1f}" for w, f in frequencies.items()) + ".", "",
             f"At matched erasure (target rate <= {MATCHED:.0f}% on common and on rare contexts, interpolated along "
             "each method's upper envelope: the most any of its seed-42 settings keeps at that erasure):", "", "| method | CARE kept | unrelated kept |", "|---|---|---|"]
    methods = list(dict.fromkeys(p["model"]["method"] for p in points.values()))
    for method in methods:
        curve = [p for p in points.values() if p["model"]["method"] == method and p["model"].get("seed", 42) == 42]
        care_at = at_matched_erasure(curve, "care_kept", MATCHED)
        unrelated_at = at_matched_erasure(curve, "unrelated_kept", MATCHED)
        lines.append(f"| {method} | " + (f"{care_at:.0f}% | {unrelated_at:.0f}%" if care_at is not None
                                         else f"never reaches {MATCHED:.0f}% | –") + " |")
    lines += ["", "Every model (classifier; kept = sum of rates over the base's, min = the lowest single prompt):", "",
              "| method | setting | target common | target rare | CARE kept | CARE kept, with target word | "
              "unrelated kept | night (own) | night (with target) | adversarial | training |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    base_rates = summarise(base, base, care)
    lines.append(f"| base | – | {pct(base_rates['target_common'])} | {pct(base_rates['target_rare'])} | – | – | – | – | – | "
                 f"{pct(base_rates['adversarial'])} | – |")
    for name, p in points.items():
        m = p["model"]
        label = f"**{m['setting']}**" if m.get("default") else m["setting"]
        train_time = "–" if p["train_seconds"] is None else f"{p['train_seconds']:.0f} s" + (" (whole run)" if m.get("snapshot") else "")
        lines.append(f"| {m['method']} | {label} | {pct(p['target_common'])} | {pct(p['target_rare'])} | "
                     f"{pair(p['care_kept'])} | {pair(p['care_kept_with_target'])} | {pair(p['unrelated_kept'])} | "
                     f"{pair(p['night_without_target'])} | {pair(p['night_with_target'])} | {pct(p['adversarial'])} | "
                     f"{train_time} |")
    lines += ["", "Per CARE concept (kept, min): " + "; ".join(
        f"{name}: " + ", ".join(f"{w} {pair(v)}" for w, v in p["care_per_concept"].items())
        for name, p in points.items() if p["model"].get("default"))]
    plot(points, args.png, args.num_images)
    (args.runs / "frontier.json").write_text(json.dumps({"base": base_rates, "points": points}, indent=1, default=str))
    return "\n".join(lines)


def train_recare(variant: str, stage2_lrs: tuple, runs: Path, images: int, reporter) -> None:
    """A ReCARE variant's default (seed 42, robust checkpoints kept), other stage-2 rates sharing its
    stage 1, and seed 43. With another image count than the first, the first erase, which reads no
    image, is taken from the first count's run of the seed where there is one."""
    def first_erase(seed):
        first = recare_run(variant, seed, FIRST_IMAGES)
        return first if images != FIRST_IMAGES and finished(runs / first) else None

    own = recare_run(variant, 42, images)
    train(own, recare_settings(variant, images), runs, reporter, snapshot_stage="robust", stage1_from=first_erase(42))
    for lr in stage2_lrs:
        train(f"{own}-lr{lr:g}", {}, runs, reporter, robust_from=own, robust_lr=lr)
    train(recare_run(variant, 43, images), recare_settings(variant, images) | {"seed": 43}, runs, reporter,
          stage1_from=first_erase(43))


def main(argv=None) -> int:
    from recare_cli.presets import MODEL_DEFAULTS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, default=Path("bench-runs/frontier"), help="erase runs and measurements")
    parser.add_argument("--phase", choices=("a", "b", "c", "measure", "report"), required=True)
    parser.add_argument("--samples", type=int, default=FIRST_SAMPLES, help="images per prompt")
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps per image")
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--until", help="measure: stop starting new measurements at this UTC time (HH:MM)")
    parser.add_argument("--num-images", type=int, default=MODEL_DEFAULTS["toy"]["num_images"],
                        help="ReCARE's training images (default: the toy's default)")
    parser.add_argument("--png", type=Path, default=Path("docs/frontier.png"))
    args = parser.parse_args(argv)
    import torch

    from recare_cli.output import HUMAN, Reporter

    torch.set_num_threads(1)
    reporter = Reporter(HUMAN)
    args.runs.mkdir(parents=True, exist_ok=True)
    if args.phase == "a":
        train_recare("p10", (5e-5, 2e-4, 3e-4), args.runs, args.num_images, reporter)
    if args.phase == "c":
        train("esd-s42", {"method": "esd"}, args.runs, reporter, snapshot_stage="esd", checkpoint_every=75)
        train("esd-s43", {"method": "esd", "seed": 43}, args.runs, reporter)
        train("esd-s42-lr0.0003", {"method": "esd", "stage1_lr": 3e-4}, args.runs, reporter)
    if args.phase == "b":
        train_recare("exact", (2e-4,), args.runs, args.num_images, reporter)
    if args.phase == "measure":
        measure_all(args, reporter)
    if args.phase == "report":
        print(report(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
