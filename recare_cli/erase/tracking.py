"""`--report-to tensorboard`: every step's losses, and a few sample images after each training stage.

The convention of diffusers' training scripts: the event files go to `<run dir>/logs`, so
`tensorboard --logdir runs/` shows every run. Written with torch's SummaryWriter (the optional
`tensorboard` extra); without --report-to nothing is imported and nothing is written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from recare_cli.errors import RecareError, UsageError

REPORT_TO = ("tensorboard",)
LOG_DIR = "logs"
SAMPLE_STEPS = 25  # denoising steps of the sample images; seeds 0..n-1, so stages compare image for image
SAMPLES_PER_PROMPT = 2


class Tracker:
    """Tracks nothing: what a run without --report-to uses."""

    def log_losses(self, stage: str, step: int, values: dict[str, float]) -> None:
        pass

    def stage_done(self, stage: str, step: int) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardTracker(Tracker):
    def __init__(self, log_dir: Path, sampler: Callable[[], list[tuple[str, object]]]):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))
        self.sampler = sampler

    def log_losses(self, stage: str, step: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.writer.add_scalar(f"{stage}/{name}", value, step)

    def stage_done(self, stage: str, step: int) -> None:
        import numpy as np

        for i, (prompt, image) in enumerate(self.sampler()):
            self.writer.add_image(f"{stage}/samples/{i}: {prompt}", np.asarray(image), step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def check_report_to(report_to: str | None) -> None:
    if report_to is None:
        return
    if report_to not in REPORT_TO:
        raise UsageError(f"--report-to '{report_to}' is not supported", hint=f"one of: {', '.join(REPORT_TO)}")
    try:
        import tensorboard  # noqa: F401 - torch's SummaryWriter needs it
    except ImportError:
        raise RecareError("--report-to tensorboard needs the tensorboard package",
                          hint="pip install 'recare[tensorboard]'") from None


def make_tracker(report_to: str | None, run_dir: Path, models, prompts: list[str], resolution: int,
                 seed: int) -> Tracker:
    if report_to is None:
        return Tracker()
    return TensorBoardTracker(Path(run_dir) / LOG_DIR, lambda: sample_images(models, prompts, resolution, seed))


def sample_images(models, prompts: list[str], resolution: int, seed: int) -> list[tuple[str, object]]:
    """(prompt, PIL image) pairs drawn with the weights as they are now, from fixed seeds."""
    import torch

    models.pipe.set_progress_bar_config(disable=True)
    samples = []
    with torch.no_grad(), models.autocast():
        for prompt in prompts:
            for i in range(SAMPLES_PER_PROMPT):
                generator = torch.Generator(models.device).manual_seed(seed + i)
                image = models.pipe(prompt, num_inference_steps=SAMPLE_STEPS, height=resolution, width=resolution,
                                    generator=generator, output_type="pil").images[0]
                samples.append((prompt, image))
    return samples
