"""Generation throughput on `tiny-random`: images/s and peak memory at batch sizes 1 and 4.

    python bench/generate.py                      # 512 px, 50 steps, 8 images per batch size, CPU
    python bench/generate.py --device cuda --images 32 --batch-sizes 1,4,16

Times `recare generate`'s rendering loop (pipeline calls and atomic PNG writes) after the model is
loaded and one warm-up batch has run. Peak memory is CUDA's allocator peak on a GPU, and the
process's peak resident set size during the timed loop on a CPU. Prints one line per batch size.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from recare_cli.generate import GenerateSettings, PromptRow, plan_jobs, render_images
from recare_cli.models import Runtime
from recare_cli.output import QUIET_REPORTER


@contextmanager
def peak_memory(device: str):
    """Yield a dict that holds {'peak_mib': …, 'what': …} once the block ends."""
    import torch

    found: dict = {}
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        yield found
        torch.cuda.synchronize()
        found.update(peak_mib=torch.cuda.max_memory_allocated() / 2**20, what="CUDA allocated")
        return
    # Linux resets the resident-set high-water mark (VmHWM) on request; elsewhere the peak covers
    # the whole process, model loading included. (A sampling thread would slow the GIL-bound loop.)
    try:
        Path("/proc/self/clear_refs").write_text("5")
        what = "process RSS"
    except OSError:
        what = "process RSS since start"
    yield found
    found.update(peak_mib=_high_water_mark_kib() / 1024, what=what)


def _high_water_mark_kib() -> int:
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024 if sys.platform == "darwin" else peak  # bytes on macOS, KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--size", type=int, default=512, help="image height and width (tiny-random's native 512)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--images", type=int, default=8, help="images timed per batch size")
    parser.add_argument("--batch-sizes", default="1,4")
    args = parser.parse_args()

    import torch

    runtime = Runtime("tiny-random", device=args.device, dtype=args.dtype)
    pipe, _, _ = runtime.pipeline()
    jobs = plan_jobs([PromptRow("a photo of a cat on a sofa")], args.images, seed=0)
    print(f"tiny-random {args.size}px, {args.steps} steps, {args.images} images, {pipe.device} {pipe.unet.dtype}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")

    for batch_size in (int(b) for b in args.batch_sizes.split(",")):
        settings = GenerateSettings(steps=args.steps, height=args.size, width=args.size, batch_size=batch_size)
        with tempfile.TemporaryDirectory() as out:
            render_images(pipe, jobs[:batch_size], Path(out), settings, reporter=QUIET_REPORTER)  # warm-up
            with peak_memory(str(pipe.device)) as memory:
                start = time.perf_counter()
                render_images(pipe, jobs, Path(out), settings, reporter=QUIET_REPORTER)
                if pipe.device.type == "cuda":
                    torch.cuda.synchronize()
                seconds = time.perf_counter() - start
        print(f"batch {batch_size:>3}: {args.images / seconds:7.3f} images/s  ({seconds / args.images:.3f} s/image)  "
              f"peak {memory['what']} {memory['peak_mib']:.0f} MiB")


if __name__ == "__main__":
    main()
