"""The ESD baseline as published (Gandikota et al., ICCV 2023), recare-method.md §9.

Followed: rohitgandikota/erasing, `esd_diffusers.py` (`train`). Each iteration samples one
(concept c, erase-from f) pair; the partial-denoising prefix runs on c with the weights being
trained (guidance 3, §2); the frozen UNet gives `eps_pos` (c), `eps_neu` ('') and `eps_tgt` (f;
the neutral prediction when f = c, as the reference sets it); the trained UNet's prediction on f
is pulled towards `eps_tgt - eta * (eps_pos - eps_neu)` with plain Adam. Unlike ReCARE's stage 1
there is no guidance normalisation and no AdamW weight decay. Only the unconditional halves the
reference computes and throws away are skipped (the result is the same).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from recare_cli.erase.context import EraseModels, regression_step, snapshot
from recare_cli.erase.denoise import NSTEPS, draw_training_latent
from recare_cli.erase.loop import StageLoop

# The published defaults (esd_diffusers.py's argparse): `--iterations 200 --lr 2e-5 --negative_guidance 1`.
ITERATIONS = 200
LR = 2e-5
ETA = 1.0


@dataclass(frozen=True)
class EsdSettings:
    iterations: int = ITERATIONS
    lr: float = LR
    eta: float = ETA  # the reference's `negative_guidance`
    resolution: int = 512
    prefix_steps: int = NSTEPS


def esd_target(eps_target: torch.Tensor, eps_pos: torch.Tensor, eps_neu: torch.Tensor, eta: float) -> torch.Tensor:
    """`eps_target - eta * (eps_pos - eps_neu)`: ESD's regression target."""
    return eps_target - eta * (eps_pos - eps_neu)


def esd_stage(models: EraseModels, trainable: dict, concepts: list[str], erase_from: list[str],
              settings: EsdSettings, loop: StageLoop) -> None:
    """Train `trainable` in place; each iteration erases one (concepts[i], erase_from[i]) pair, drawn uniformly."""
    frozen = snapshot(trainable)
    optimizer = torch.optim.Adam(trainable.values(), lr=settings.lr)
    models.unet.train()
    start = loop.resume(trainable, optimizer)
    embeds_neutral = models.embed([""])
    for step in range(start, settings.iterations):
        i = np.random.choice(len(concepts))
        concept, source = concepts[i], erase_from[i]
        embeds_concept = models.embed([concept])
        embeds_source = models.embed([source])
        latents_k, t = draw_training_latent(models, torch.cat([embeds_neutral, embeds_concept]),
                                            settings.resolution, settings.prefix_steps)

        with torch.no_grad():
            frozen_embeds = [embeds_concept, embeds_neutral] + ([embeds_source] if source != concept else [])
            eps_frozen = models.eps(latents_k.expand(len(frozen_embeds), -1, -1, -1), t,
                                    torch.cat(frozen_embeds), weights=frozen)
            eps_pos, eps_neu = eps_frozen[:1], eps_frozen[1:2]
            eps_source = eps_frozen[2:] if source != concept else eps_neu
            eps_goal = esd_target(eps_source, eps_pos, eps_neu, settings.eta)

        loss = regression_step(models, optimizer, latents_k, t, embeds_source, eps_goal)
        loop.step_done(step, loss=loss)
    models.unet.eval()
