"""What `keep_freed_memory` buys on a CPU: a 512 px VAE encode and decode of `tiny-random`, before and after.

    python bench/cpu_memory.py                 # 7 calls each, the median
    python bench/cpu_memory.py --resolution 1024 --calls 3

glibc gives each allocation over 32 MiB an mmap of its own and unmaps it on free, so every such
activation page-faults its pages in anew. recare's CPU pipelines switch that off
(recare_cli.models.runtime.keep_freed_memory). The setting is process-wide and cannot be undone,
so this script measures the library default first and then the same calls after the switch, in
one process, and prints milliseconds and minor page faults per call.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from pathlib import Path


def per_call(fn, calls: int) -> tuple[float, float]:
    """(median milliseconds, mean minor page faults) of `fn()` over `calls` calls, after one warm-up."""
    fn()
    times, faults = [], []
    for _ in range(calls):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1000)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return statistics.median(times), statistics.mean(faults)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--calls", type=int, default=7)
    parser.add_argument("--cache-dir", type=Path, default=None)
    args = parser.parse_args(argv)

    import torch

    from recare_cli.models import builtin_path
    from recare_cli.models.runtime import keep_freed_memory, load_pipeline, resolve_model
    from recare_cli.output import quiet_libraries

    quiet_libraries()
    builtin_path("tiny-random", args.cache_dir)
    # load_pipeline, not Runtime.pipeline: the latter already switches the allocator on a CPU.
    pipe = load_pipeline(resolve_model("tiny-random", args.cache_dir, offline=True), torch_dtype=torch.float32,
                         offline=True)
    pixels = torch.rand(1, 3, args.resolution, args.resolution) * 2 - 1
    latents = torch.randn(1, 4, args.resolution // 8, args.resolution // 8)
    calls = {"VAE encode": lambda: pipe.vae.encode(pixels), "VAE decode": lambda: pipe.vae.decode(latents)}
    print(f"tiny-random VAE at {args.resolution} px, CPU, torch threads {torch.get_num_threads()}, "
          f"median of {args.calls} calls")
    print(f"{'':<12}{'glibc default':>26}{'keep_freed_memory':>26}")
    with torch.no_grad():
        plain = {name: per_call(fn, args.calls) for name, fn in calls.items()}
        if not keep_freed_memory():
            sys.exit("this C library has no glibc mallopt: nothing to compare")
        tuned = {name: per_call(fn, args.calls) for name, fn in calls.items()}
    for name in calls:
        (ms_plain, faults_plain), (ms_tuned, faults_tuned) = plain[name], tuned[name]
        print(f"{name:<12}{ms_plain:>9.1f} ms {faults_plain:>8.0f} faults{ms_tuned:>9.1f} ms {faults_tuned:>8.0f} faults")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
