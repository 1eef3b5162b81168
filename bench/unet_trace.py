"""Benchmark (not a test): one `tiny-random` UNet call through `EraseModels.eps`, traced and as a module.

Alternates the two in one process so the VM's drift hits both alike; prints the medians of a
batch-2 no-grad forward at 64x64 latents (the partial-denoising prefix's call) and of an inversion
step's forward and backward to the text embedding (batch 1).

    python bench/unet_trace.py [--calls 15]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=15)
    args = parser.parse_args()

    import torch

    import recare_cli.erase.traced as traced
    from recare_cli.erase.context import EraseModels
    from recare_cli.models import Runtime

    traced.TRACE_AFTER = 1  # the timing starts after the first call of each signature
    pipe, _, _ = Runtime("tiny-random", device="cpu", offline=True).pipeline()
    models = {"traced": EraseModels.from_pipeline(copy.deepcopy(pipe), "cpu"),
              "module": EraseModels.from_pipeline(copy.deepcopy(pipe), "cpu")}
    models["module"].traces = None
    embeds = models["module"].embed(["a photo of a cat", ""])
    latents = torch.randn(2, 4, 64, 64)

    def forward(m):
        with torch.no_grad():
            m.eps(latents, 500, embeds)

    def inversion_step(m):
        text = embeds[:1].clone().requires_grad_(True)
        m.eps(latents[:1], torch.tensor([500]), text).square().mean().backward()

    for name, call in (("batch-2 forward", forward), ("inversion step", inversion_step)):
        times = {"traced": [], "module": []}
        for m in models.values():
            call(m)  # the trace is taken here
        for _ in range(args.calls):
            for key, m in models.items():
                started = time.perf_counter()
                call(m)
                times[key].append(time.perf_counter() - started)
        print(f"{name}: traced {statistics.median(times['traced']) * 1000:.1f} ms, "
              f"module {statistics.median(times['module']) * 1000:.1f} ms (medians of {args.calls})")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
