"""Stage 2: robust erase with the CARE set (recare-method.md §5).

Starts from the original UNet; the text encoder holds the learned tokens. Each iteration erases
e_i towards the compositional target over every erase concept (scale -S) and the anchor a_i
(scale +S), while keeping the retain prompt r_i's prediction unchanged. Every frozen prediction
shares one latent and one timestep, so they run as one batched forward; both trained ones too.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from recare_cli.erase.context import EraseModels, snapshot
from recare_cli.erase.denoise import draw_training_latent
from recare_cli.erase.guidance import MomentumBuffer, compositional_target
from recare_cli.erase.loop import StageLoop
from recare_cli.erase.stage1 import EraseSettings

RETAIN_WEIGHT = 1.0  # lambda


def balanced_schedule(items: list[str], iterations: int, rng: np.random.Generator) -> list[str]:
    """`items` repeated iterations // len times and shuffled, topped up by a draw without replacement."""
    schedule = list(items) * (iterations // len(items))
    rng.shuffle(schedule)
    remainder = iterations - len(schedule)
    if remainder > 0:
        schedule += [str(x) for x in rng.choice(items, remainder, replace=False)]
    return schedule


def robust_erase_stage(models: EraseModels, trainable: dict, erase: list[str], anchors: list[str],
                       retains: list[str], settings: EraseSettings, loop: StageLoop) -> None:
    """Train `trainable` in place; `settings.guidance_scale` is S."""
    frozen = snapshot(trainable)
    optimizer = torch.optim.AdamW(trainable.values(), lr=settings.lr)
    scale = settings.guidance_scale
    buffers = [MomentumBuffer(settings.knobs.momentum) for _ in range(len(erase) + 1)] if settings.knobs.momentum else None
    models.unet.train()
    # Their own generator, seeded from --seed: a resumed run rebuilds the very same schedules.
    schedule_rng = np.random.default_rng(loop.seed)
    anchor_schedule = balanced_schedule(anchors, settings.iterations, schedule_rng)
    retain_schedule = balanced_schedule(retains, settings.iterations, schedule_rng)
    erase_schedule = balanced_schedule(erase, settings.iterations, schedule_rng)
    start = loop.resume(trainable, optimizer, buffers)

    embeds_neutral = models.embed([""])
    embeds_erase_all = models.embed(erase)
    for step in range(start, settings.iterations):
        erase_prompt, anchor_prompt, retain_prompt = erase_schedule[step], anchor_schedule[step], retain_schedule[step]
        embeds_e = models.embed([erase_prompt])
        latents_k, t = draw_training_latent(models, torch.cat([embeds_neutral, embeds_e]),
                                            settings.resolution, settings.prefix_steps)

        with torch.no_grad():
            embeds_frozen = torch.cat([embeds_neutral, embeds_erase_all, models.embed([anchor_prompt, retain_prompt])])
            eps_frozen = models.eps(latents_k.expand(len(embeds_frozen), -1, -1, -1), t, embeds_frozen, weights=frozen)
            eps_neu, eps_erase, eps_anchor, eps_retain_frozen = eps_frozen.split([1, len(erase), 1, 1])
            eps_target = compositional_target(
                [*eps_erase.split(1), eps_anchor], eps_neu, [-scale] * len(erase) + [scale], settings.knobs, buffers,
            )

        optimizer.zero_grad(set_to_none=True)
        eps_theta_erase, eps_theta_retain = models.eps(
            latents_k.expand(2, -1, -1, -1), t, torch.cat([embeds_e, models.embed([retain_prompt])])).chunk(2)
        erase_loss = F.mse_loss(eps_theta_erase, eps_target)
        retain_loss = F.mse_loss(eps_theta_retain, eps_retain_frozen)
        loss = erase_loss + RETAIN_WEIGHT * retain_loss
        loss.backward()
        optimizer.step()
        loop.step_done(step, loss=loss, erase_loss=erase_loss, retain_loss=retain_loss)
    models.unet.eval()
