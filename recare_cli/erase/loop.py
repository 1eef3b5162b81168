"""What every training stage does around its step: seeding, resume, loss log, checkpoints, NaN stop.

A stage's loop is written out in its own module; it calls `StageLoop.resume` once and
`StageLoop.step_done` after each optimizer step. The periodic checkpoint holds the trained
weights, the optimizer state and every RNG state, so a resumed stage continues bit for bit.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import torch

from recare_cli.erase.tracking import Tracker
from recare_cli.errors import RecareError
from recare_cli.fsutil import atomic_path, json_text, write_text
from recare_cli.output import QUIET_REPORTER, Reporter

CHECKPOINT = "checkpoint.pt"
LOSS_LOG = "losses.jsonl"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class StageLoop:
    def __init__(self, run_dir: Path, stage: str, total: int, seed: int, checkpoint_every: int,
                 reporter: Reporter = QUIET_REPORTER, task=None, tracker: Tracker | None = None):
        self.run_dir = Path(run_dir)
        self.stage = stage
        self.total = total
        self.seed = seed
        self.checkpoint_every = checkpoint_every
        self.reporter = reporter
        self.task = task
        self.tracker = tracker or Tracker()
        self._params: dict = {}
        self._optimizer = None
        self._buffers: list = []

    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir / CHECKPOINT

    def resume(self, params: dict, optimizer, buffers: list | None = None) -> int:
        """The step to start at: after the stage's last checkpoint, or 0 with fresh seeds."""
        self._params, self._optimizer, self._buffers = params, optimizer, buffers or []
        saved = self._read_checkpoint()
        if saved is None:
            seed_everything(self.seed)
            self._trim_log(0)
            return 0
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(saved["params"][name].to(p.device, p.dtype))
        optimizer.load_state_dict(saved["optimizer"])
        for buffer, value in zip(self._buffers, saved["buffers"]):
            buffer.running_average = None if value is None else value.to(next(iter(params.values())).device)
        _set_rng_state(saved["rng"])
        start = saved["step"] + 1
        self._trim_log(start)
        if self.task is not None:
            self.task.set_completed(start)
        self.reporter.event("resume", stage=self.stage, step=start)
        return start

    def _read_checkpoint(self) -> dict | None:
        if not self.checkpoint_path.is_file():
            return None
        try:
            saved = torch.load(self.checkpoint_path, map_location="cpu", weights_only=False)
        except Exception:  # noqa: BLE001 - a torn or foreign file: start the stage again
            self.reporter.warn(f"ignoring unreadable checkpoint {self.checkpoint_path}")
            return None
        return saved if saved.get("stage") == self.stage else None

    def _trim_log(self, start: int) -> None:
        """Drop this stage's log lines from `start` on: they belong to an interrupted attempt."""
        path = self.run_dir / LOSS_LOG
        if not path.is_file():
            return
        kept = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by a kill
            if entry.get("stage") != self.stage or entry.get("step", 0) < start:
                kept.append(line + "\n")
        write_text(path, "".join(kept))

    def step_done(self, step: int, **losses: torch.Tensor) -> None:
        values = {name: float(value.detach()) for name, value in losses.items()}
        if not all(math.isfinite(v) for v in values.values()):
            bad = ", ".join(f"{k}={v}" for k, v in values.items())
            kept = "the last checkpoint is kept" if self.checkpoint_path.is_file() else "finished stages are kept"
            raise RecareError(
                f"training diverged in stage {self.stage} at step {step}: {bad}; {kept}",
                hint="lower the learning rate (or use --dtype fp32) and rerun",
            )
        with open(self.run_dir / LOSS_LOG, "a", encoding="utf-8") as log:
            log.write(json_text({"stage": self.stage, "step": step, **values}, undefined_as_null=True) + "\n")
        self.tracker.log_losses(self.stage, step, values)
        if self.task is not None:
            self.task.advance(1, loss=values["loss"])
        done = step + 1
        if done % self.checkpoint_every == 0 and done < self.total:
            self.save_checkpoint(step)

    def save_checkpoint(self, step: int) -> None:
        state = {
            "stage": self.stage,
            "step": step,
            "params": {name: p.detach().cpu() for name, p in self._params.items()},
            "optimizer": self._optimizer.state_dict(),
            "buffers": [None if b.running_average is None else b.running_average.cpu() for b in self._buffers],
            "rng": _rng_state(),
        }
        with atomic_path(self.checkpoint_path) as tmp:
            torch.save(state, tmp)
        self.reporter.event("checkpoint", stage=self.stage, step=step + 1)

    def finish(self) -> None:
        """The stage's result is saved: any periodic checkpoint (stages run in order) is stale."""
        self.checkpoint_path.unlink(missing_ok=True)
        self.tracker.stage_done(self.stage, self.total)
