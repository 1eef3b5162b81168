"""What every training stage does around its step: seeding, resume, loss log, checkpoints, NaN stop.

A stage's loop is written out in its own module; it calls `StageLoop.resume` once,
`StageLoop.step_done` after each optimizer step and `StageLoop.save_stage` with its result. The
periodic checkpoint holds the trained weights, the optimizer state and every RNG state, so a
resumed stage continues bit for bit.

A run directory is user input (people share them), so a checkpoint is never unpickled: it is one
safetensors file (tensors: weights, optimizer moments, momentum buffers, torch RNG states) whose
header carries the rest as JSON (step, Python/NumPy RNG states, optimizer scalars). One file,
renamed into place, is written atomically as a unit.
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
from recare_cli.fsutil import json_text, write_safetensors, write_text
from recare_cli.models import non_finite
from recare_cli.output import QUIET_REPORTER, Reporter

CHECKPOINT = "checkpoint.safetensors"
LEGACY_CHECKPOINT = "checkpoint.pt"  # older recare's pickled checkpoint: never read, removed with the stage
LOSS_LOG = "losses.jsonl"
CHECKPOINT_FORMAT = "recare-checkpoint-1"
STATE_KEY = "recare_checkpoint"  # the header entry holding the JSON part


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# checkpoint (de)serialisation: tensors by name, everything else as JSON -----------------------------

def _pack(stage: str, step: int, params: dict, optimizer, buffers: list) -> tuple[dict, dict]:
    tensors = {f"param/{name}": p.detach().cpu().contiguous() for name, p in params.items()}
    saved = optimizer.state_dict()
    optimizer_state = {}
    for index, values in saved["state"].items():
        entry = {}
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer/{index}/{key}"] = value.detach().cpu().contiguous()
                entry[key] = {"tensor": f"optimizer/{index}/{key}"}
            else:
                entry[key] = value
        optimizer_state[str(index)] = entry
    for i, buffer in enumerate(buffers):
        if buffer.running_average is not None:
            tensors[f"buffer/{i}"] = buffer.running_average.detach().cpu().contiguous()
    tensors["rng/torch"] = torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    for i, cuda_state in enumerate(cuda_states):
        tensors[f"rng/cuda/{i}"] = cuda_state
    version, mt_state, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "format": CHECKPOINT_FORMAT, "stage": stage, "step": step,
        "optimizer": {"state": optimizer_state, "param_groups": saved["param_groups"]},
        "buffers": [b.running_average is not None for b in buffers],
        "rng": {"python": [version, list(mt_state), gauss],
                "numpy": [np_name, np_keys.tolist(), np_pos, np_has_gauss, np_gauss],
                "cuda": len(cuda_states)},
    }
    return tensors, state


def _unpack(tensors: dict, state: dict, params: dict, optimizer, buffers: list) -> dict:
    """The checkpoint as resume applies it; raises (KeyError, ValueError…) on anything that does not fit."""
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"not a {CHECKPOINT_FORMAT} file")
    weights = {name: tensors[f"param/{name}"] for name in params}
    for name, p in params.items():
        if weights[name].shape != p.shape:
            raise ValueError(f"{name} has shape {tuple(weights[name].shape)}, not {tuple(p.shape)}")
    optimizer_state = {
        int(index): {key: tensors[value["tensor"]] if isinstance(value, dict) else value for key, value in entry.items()}
        for index, entry in state["optimizer"]["state"].items()
    }
    # JSON turns tuples (Adam's betas) into lists: give each setting the type the optimizer uses.
    groups = [{key: tuple(value) if isinstance(current.get(key), tuple) else value for key, value in group.items()}
              for group, current in zip(state["optimizer"]["param_groups"], optimizer.param_groups)]
    if len(groups) != len(optimizer.param_groups) or len(state["buffers"]) != len(buffers):
        raise ValueError("the optimizer or guidance buffers do not match this stage")
    version, mt_state, gauss = state["rng"]["python"]
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = state["rng"]["numpy"]
    torch_state = tensors["rng/torch"]
    if torch_state.dtype != torch.uint8 or torch_state.shape != torch.get_rng_state().shape:
        raise ValueError("the torch RNG state does not fit")
    return {
        "step": int(state["step"]), "params": weights,
        "optimizer": {"state": optimizer_state, "param_groups": groups},
        "buffers": [tensors[f"buffer/{i}"] if present else None for i, present in enumerate(state["buffers"])],
        "python": (int(version), tuple(int(v) for v in mt_state), None if gauss is None else float(gauss)),
        "numpy": (str(np_name), np.asarray(np_keys, dtype=np.uint32), int(np_pos), int(np_has_gauss), float(np_gauss)),
        "torch": torch_state,
        "cuda": [tensors[f"rng/cuda/{i}"] for i in range(int(state["rng"]["cuda"]))],
    }


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
        optimizer.load_state_dict(saved["optimizer"])
        device = next(iter(params.values())).device
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(saved["params"][name].to(p.device, p.dtype))
        for buffer, value in zip(self._buffers, saved["buffers"]):
            buffer.running_average = None if value is None else value.to(device)
        random.setstate(saved["python"])
        np.random.set_state(saved["numpy"])
        torch.set_rng_state(saved["torch"])
        if saved["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(saved["cuda"])
        start = saved["step"] + 1
        self._trim_log(start)
        if self.task is not None:
            self.task.set_completed(start)
        self.reporter.event("resume", stage=self.stage, step=start)
        return start

    def _read_checkpoint(self) -> dict | None:
        if (self.run_dir / LEGACY_CHECKPOINT).exists():
            self.reporter.warn(f"ignoring {self.run_dir / LEGACY_CHECKPOINT}, a pickled checkpoint: "
                               "recare never unpickles files")
        if not self.checkpoint_path.is_file():
            return None
        from safetensors import safe_open

        try:
            with safe_open(str(self.checkpoint_path), framework="pt") as handle:
                state = json.loads((handle.metadata() or {})[STATE_KEY])
                if state.get("stage") != self.stage:
                    return None  # an earlier stage's leftover: this stage starts fresh
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}
            return _unpack(tensors, state, self._params, self._optimizer, self._buffers)
        except Exception:  # noqa: BLE001 - a torn, foreign or damaged file: start the stage again
            self.reporter.warn(f"ignoring unreadable checkpoint {self.checkpoint_path}; stage {self.stage} starts again")
            return None

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

    def _kept(self) -> str:
        return "the last checkpoint is kept" if self.checkpoint_path.is_file() else "finished stages are kept"

    def step_done(self, step: int, **losses: torch.Tensor) -> None:
        values = {name: float(value.detach()) for name, value in losses.items()}
        if not all(math.isfinite(v) for v in values.values()):
            bad = ", ".join(f"{k}={v}" for k, v in values.items())
            raise RecareError(
                f"training diverged in stage {self.stage} at step {step}: {bad}; {self._kept()}",
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

    def require_finite(self, tensors: dict, step: int | None = None) -> None:
        """Refuse to keep exploded weights: nothing non-finite is ever written."""
        bad = non_finite(tensors)
        if bad:
            at = f" at step {step}" if step is not None else ""
            raise RecareError(
                f"training diverged in stage {self.stage}{at}: {len(bad)} of {len(tensors)} trained tensors "
                f"are not finite (e.g. {bad[0]}); nothing was saved, {self._kept()}",
                hint="lower the learning rate and rerun",
            )

    def save_checkpoint(self, step: int) -> None:
        self.require_finite(self._params, step)
        tensors, state = _pack(self.stage, step, self._params, self._optimizer, self._buffers)
        write_safetensors(self.checkpoint_path, tensors, {STATE_KEY: json.dumps(state)})
        self.reporter.event("checkpoint", stage=self.stage, step=step + 1)

    def save_stage(self, path: Path, tensors: dict, metadata: dict | None = None) -> None:
        """Write the stage's result (finite, or not at all); its periodic checkpoint is then stale."""
        self.require_finite(tensors)
        write_safetensors(path, tensors, metadata)
        self.checkpoint_path.unlink(missing_ok=True)
        (self.run_dir / LEGACY_CHECKPOINT).unlink(missing_ok=True)
        self.tracker.stage_done(self.stage, self.total)
