"""How far rounding a UNet's weights to fp16 / bf16 moves export's probe: the measurement behind export.TOLERANCE.

An export in fp16 or bf16 is loaded back and compared with the fp32 source by `unet_probe` (a
forward in fp32 on a fixed input); the only difference is the rounding of every weight. This
script builds a UNet with Stable Diffusion 1.4's configuration (random weights: no real weights
can be downloaded here), rounds its weights as an export does, and prints the probe's max |diff|
for each dtype next to the tolerance the check allows.

    python bench/export_tolerance.py               # the full-size SD 1.4 UNet (860M parameters, ~7 GB RAM)
    python bench/export_tolerance.py --tiny        # tiny-random's UNet, for comparison
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def sd14_unet_config() -> dict:
    spec = importlib.util.spec_from_file_location("bench_erase", ROOT / "bench" / "erase.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench.sd14_configs(dry_run=False)["unet"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny-random's UNet instead of SD 1.4's")
    parser.add_argument("--seeds", type=int, default=1, help="random initialisations to measure")
    args = parser.parse_args()

    import torch
    from diffusers import UNet2DConditionModel

    from recare_cli.export import TOLERANCE, max_abs_diff, unet_probe
    from recare_cli.models.builtin import package_config

    config = package_config("tiny-random")["unet"] if args.tiny else sd14_unet_config()
    worst = {"fp16": 0.0, "bf16": 0.0}
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**config).eval()
        started = time.perf_counter()
        reference = unet_probe(unet)
        source = {k: v.clone() for k, v in unet.state_dict().items()}
        for name, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
            unet.load_state_dict({k: v.to(dtype).float() for k, v in source.items()})
            worst[name] = max(worst[name], max_abs_diff(unet_probe(unet), reference))
        unet.load_state_dict(source)
        print(f"seed {seed}: probe |eps| max {reference.abs().max().item():.3g}, "
              f"{time.perf_counter() - started:.0f} s", flush=True)
    label = "tiny-random UNet" if args.tiny else "SD 1.4 UNet (random weights)"
    for name, diff in worst.items():
        print(f"{label}: {name} rounding moves the probe by {diff:.3g} (tolerance {TOLERANCE[name]:g}, "
              f"{TOLERANCE[name] / diff:.1f}x the measurement)")


if __name__ == "__main__":
    main()
