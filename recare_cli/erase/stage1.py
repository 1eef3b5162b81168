"""Stage 1, step 1 (and the whole ESD baseline): erase concepts with single negative guidance.

recare-method.md §4.1: from a partial-denoise latent z_k on the concept, train the UNet so its
prediction for the concept (or for the prompt it is erased from, the reference's `erase_from`)
matches `eps_pos - (g - 1) * update(eps_pos - eps_neu, eps_pos)`, where both frozen predictions
come from the UNet as it was when this erase stage started.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from recare_cli.erase.context import EraseModels, regression_step, snapshot
from recare_cli.erase.denoise import NSTEPS, draw_training_latent
from recare_cli.erase.guidance import GuidanceKnobs, MomentumBuffer, single_negative_target
from recare_cli.erase.loop import StageLoop


@dataclass(frozen=True)
class EraseSettings:
    """One erase stage's settings (stage 1 and stage 2 alike; stage 2 passes its own lr and scale)."""

    iterations: int = 200
    lr: float = 0.5e-5
    guidance_scale: float = 2.0  # stage 1: --negative-guidance; stage 2: --compositional-guidance-scale
    resolution: int = 512
    prefix_steps: int = NSTEPS
    knobs: GuidanceKnobs = GuidanceKnobs()


def erase_stage(models: EraseModels, trainable: dict, concepts: list[str], settings: EraseSettings,
                loop: StageLoop, erase_from: list[str] | None = None) -> None:
    """Train `trainable` in place; each iteration erases one of `concepts`, drawn uniformly.

    `erase_from[i]` is the prompt whose prediction is trained when erasing `concepts[i]` (default:
    the concept itself); the partial denoising and the frozen predictions stay on the concept.
    """
    erase_from = erase_from or concepts
    frozen = snapshot(trainable)
    optimizer = torch.optim.AdamW(trainable.values(), lr=settings.lr)
    buffer = MomentumBuffer(settings.knobs.momentum) if settings.knobs.momentum else None
    models.unet.train()
    start = loop.resume(trainable, optimizer, [buffer] if buffer else None)
    embeds_neutral = models.embed([""])
    for step in range(start, settings.iterations):
        i = np.random.choice(len(concepts))
        embeds_concept = models.embed([concepts[i]])
        embeds_trained = embeds_concept if erase_from[i] == concepts[i] else models.embed([erase_from[i]])
        latents_k, t = draw_training_latent(models, torch.cat([embeds_neutral, embeds_concept]),
                                            settings.resolution, settings.prefix_steps)

        with torch.no_grad():
            eps_pos, eps_neu = models.eps(latents_k.expand(2, -1, -1, -1), t,
                                          torch.cat([embeds_concept, embeds_neutral]), weights=frozen).chunk(2)
            eps_target = single_negative_target(eps_pos, eps_neu, settings.guidance_scale, settings.knobs, buffer)

        loss = regression_step(models, optimizer, latents_k, t, embeds_trained, eps_target)
        loop.step_done(step, loss=loss)
    models.unet.eval()
