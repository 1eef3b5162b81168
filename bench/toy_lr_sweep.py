"""Sweep of ReCARE's robust-stage learning rate on the toy model (a benchmark, not a test).

How `--stage2-lr` trades erasure against what the robust stage keeps: the measurement behind the
toy model's default (recare_cli/presets.py). Stage 1 (erase and inversion rounds), the training
images and the CARE set do not depend on `--stage2-lr`, so they are trained once, as
`recare erase --model toy --concept star --prefix-steps 10` would (reused from --runs when there),
and each rate's run directory starts from that run's stage-1 files and trains only the robust
stage. Rates are measured as in bench/toy_quality.py, against the base model measured here too.

    python bench/toy_lr_sweep.py      # 3e-5,5e-5,1e-4,3e-4: 19 minutes on 2 cores, stage 1 reused
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import toy_quality as tq  # bench/, the script's own folder


def seed_run_dir(request, reference: Path, runtime, stages: list[str]) -> None:
    """Start `request`'s run directory with the reference run's finished `stages` (weights and
    records), which run_erase then reuses: for runs that differ only in what those stages never read."""
    from recare_cli.erase.inputs import STAGES_DIR
    from recare_cli.erase.request import with_method_defaults
    from recare_cli.erase.run import MANIFEST, input_hashes, run_hash

    out = request.output_dir
    (out / STAGES_DIR).mkdir(parents=True)
    for stage in stages:
        shutil.copy2(reference / STAGES_DIR / f"{stage}.safetensors", out / STAGES_DIR / f"{stage}.safetensors")
    records = json.loads((reference / MANIFEST).read_text())["stages"]
    request = with_method_defaults(request)  # as run_erase hashes it
    digest = run_hash(request, runtime.resolve().describe(), runtime.dtype, input_hashes(request))
    (out / MANIFEST).write_text(json.dumps({"run_hash": digest, "method": request.method,
                                            "stages": {stage: records[stage] for stage in stages}}))


def robust_only_request(reference, lr: float, runs: Path, output_dir: Path | None = None):
    """The reference run's request with another stage-2 rate, in a run directory (default: named by
    concept and rate) seeded with its stage 1."""
    from dataclasses import replace

    from recare_cli.erase.inputs import CARESET_FILE, IMAGES_DIR
    from recare_cli.erase.run import MANIFEST, EraseRequest
    from recare_cli.models import Runtime

    params = json.loads((reference.run_dir / MANIFEST).read_text())["parameters"]
    request = EraseRequest(**{k: v for k, v in params.items() if k not in ("output_dir",)})
    output_dir = output_dir or runs / f"{'-'.join(request.concepts)}-stage2-lr{lr:g}"
    request = replace(request, stage2_lr=lr, output_dir=output_dir,
                      images=reference.run_dir / IMAGES_DIR / request.concepts[0],
                      careset=reference.run_dir / CARESET_FILE)
    if not request.output_dir.exists():
        stage1 = [k for k in reference.stages if k.startswith(("erase-", "inversion-"))]
        seed_run_dir(request, reference.run_dir, Runtime("toy", device="cpu"), stage1)
    return request


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concept", default="star", help="toy preset to erase: star or stripes")
    parser.add_argument("--lrs", default="3e-5,5e-5,1e-4,3e-4", help="comma-separated --stage2-lr values")
    parser.add_argument("--samples", type=int, default=8, help="images per prompt")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--runs", type=Path, default=Path("bench-runs/toy"), help="erase runs (reused when rerun)")
    parser.add_argument("--out", type=Path, default=Path("bench-runs/toy"), help="where lr-sweep-<concept>.json / .md go")
    args = parser.parse_args(argv)

    from safetensors.torch import load_file

    from recare_cli.erase.run import run_erase
    from recare_cli.learned_tokens import add_learned_tokens
    from recare_cli.models import Runtime
    from recare_cli.output import HUMAN, Reporter

    reporter = Reporter(HUMAN)
    lrs = [float(x) for x in args.lrs.split(",")]
    reference = tq.erase(args.concept, tq.VARIANTS["recare --prefix-steps 10"], args.runs, reporter)[0]
    groups = tq.concept_groups(args.concept, tq.care_set_words(reference.run_dir))

    pipe, _, _ = Runtime("toy", device="cpu").pipeline()
    add_learned_tokens(pipe, reference.run_dir / "tokens.safetensors")  # every rate's run shares stage 1's tokens
    judge = tq.Judge()

    def measure() -> dict:
        return tq.measure(pipe, judge, groups, args.concept, reference.tokens, args.samples, args.steps, args.guidance)

    reporter.info("[bold]generate[/] base")
    base = measure()
    rows = []
    for lr in lrs:
        reporter.info(f"[bold]robust stage[/] --stage2-lr {lr:g}")
        result = run_erase(robust_only_request(reference, lr, args.runs), Runtime("toy", device="cpu"), reporter)
        pipe.unet.load_state_dict(load_file(str(result.unet_path)))
        started = time.perf_counter()
        rates = measure()
        rows.append({"stage2_lr": lr, "robust_seconds": result.stages["robust"]["seconds"],
                     "generate_seconds": round(time.perf_counter() - started, 1), "rates": rates,
                     "kept": {g: tq.mean(tq.kept_ratios(rates, base, g)) for g in ("CARE", "unrelated")}})

    lines = [f"`--stage2-lr` sweep, `{args.concept}` on `--model toy` (--prefix-steps 10, stage 1 shared; "
             f"{args.samples} images per prompt; classifier)", "",
             "| --stage2-lr | target | adversarial tokens | CARE kept | unrelated kept | robust stage |",
             "|---|---|---|---|---|---|",
             f"| base | {base['target'][args.concept]['classifier']:.0f}% | "
             f"{base['adversarial'][args.concept]['classifier']:.0f}% | – | – | – |"]
    for row in rows:
        lines.append(f"| {row['stage2_lr']:g} | {row['rates']['target'][args.concept]['classifier']:.0f}% | "
                     f"{row['rates']['adversarial'][args.concept]['classifier']:.0f}% | {row['kept']['CARE']:.0f}% | "
                     f"{row['kept']['unrelated']:.0f}% | {row['robust_seconds']:.0f} s |")
    table = "\n".join(lines)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"concept": args.concept, "groups": groups, "samples": args.samples, "steps": args.steps,
              "guidance": args.guidance, "machine": tq.machine(), "base": base, "rows": rows}
    (args.out / f"lr-sweep-{args.concept}.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / f"lr-sweep-{args.concept}.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
