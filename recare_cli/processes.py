"""The processes of an `accelerate launch` run: which one this is, its device, and meeting the others.

`generate` splits images by index between the processes, `eval` generates that way and measures
on the main process, and `erase --recipe` gives each process whole entries. Outside `accelerate
launch` (WORLD_SIZE unset or 1) every helper here answers "one process, the main one".
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import replace
from datetime import timedelta
from typing import Iterator

from recare_cli.errors import RecareError
from recare_cli.models import Runtime

# The longest a process that has finished its recipe entries waits for the others. A recipe entry
# can train for hours, far past torch's default collective timeout (30 min on gloo, 10 on NCCL),
# after which the waiting process would fail and take the launch down with it.
LONG_WAIT = timedelta(days=7)

_alone = False


def launched_world() -> int:
    """How many processes `accelerate launch` started (1 outside it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def process_group(runtime: Runtime):
    """(rank, world size, state) under `accelerate launch`, else (0, 1, None); (0, 1, None) inside `alone()`."""
    world = launched_world()
    if world <= 1 or _alone:
        return 0, 1, None
    from accelerate import PartialState

    # Without cpu=True accelerate forms a process group only over accelerators, and every CPU
    # process would render every image.
    state = PartialState(cpu=runtime.torch_device() == "cpu")
    if state.num_processes != world:
        raise RecareError(
            f"accelerate started {world} processes but they formed a group of {state.num_processes}",
            hint="launch on CUDA devices, or pass --device cpu",
        )
    return state.process_index, state.num_processes, state


def own_device(runtime: Runtime, state) -> Runtime:
    """`runtime` on this process's accelerator (cuda:local_rank); an explicit --device cpu or cuda:N still wins."""
    if state is None or runtime.device not in ("auto", "cuda"):
        return runtime
    return replace(runtime, device=str(state.device))


@contextmanager
def alone() -> Iterator[None]:
    """Within, this process works by itself: a recipe entry renders all of its own training images."""
    global _alone
    before, _alone = _alone, True
    try:
        yield
    finally:
        _alone = before


def waiting_group():
    """A gloo group over every process whose collectives wait up to LONG_WAIT (gloo: no GPU spins while waiting).

    Every process must call this at the same point, as for any collective.
    """
    import torch.distributed as dist

    return dist.new_group(backend="gloo", timeout=LONG_WAIT)


def gather_to_main(items: list, group) -> list | None:
    """Every process's `items`, concatenated in rank order, on the main process; None elsewhere."""
    import torch.distributed as dist

    rank = dist.get_rank()
    gathered = [None] * dist.get_world_size() if rank == 0 else None
    dist.gather_object(items, gathered, dst=0, group=group)
    return [item for part in gathered for item in part] if rank == 0 else None


def broadcast_from_main(value, group):
    """The main process's `value`, on every process."""
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]
