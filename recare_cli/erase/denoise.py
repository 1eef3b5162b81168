"""The partial-denoising prefix both erase objectives start from (recare-method.md §2).

Each iteration draws k in 1..48, runs DDIM (eta 0) from pure noise for the first k steps of a
50-step schedule with guidance 3 on the erase prompt, and trains at the 1000-step schedule's
timestep at the same fraction of the trajectory. `prefix_steps` < 50 reaches the same noise level
with fewer, larger DDIM steps (perf-notes.md); 50 reproduces the spec step for step.
"""

from __future__ import annotations

import numpy as np
import torch

NSTEPS = 50
PREFIX_GUIDANCE = 3.0


class DDIMTimes:
    """The two schedules of a DDIM scheduler config: 50 steps for the prefix, 1000 for training."""

    def __init__(self, scheduler):
        from diffusers import DDIMScheduler

        ddim = DDIMScheduler.from_config(scheduler.config)
        ddim.set_timesteps(NSTEPS)
        self.timesteps_50 = [int(t) for t in ddim.timesteps]
        self.stride_50 = ddim.config.num_train_timesteps // NSTEPS
        ddim.set_timesteps(ddim.config.num_train_timesteps)
        self.timesteps_1000 = [int(t) for t in ddim.timesteps]
        self.alphas_cumprod = ddim.alphas_cumprod
        self.final_alpha_cumprod = ddim.final_alpha_cumprod
        self.init_noise_sigma = float(ddim.init_noise_sigma)

    def alpha(self, t: int) -> torch.Tensor:
        return self.alphas_cumprod[t] if t >= 0 else self.final_alpha_cumprod

    def training_timestep(self, k: int) -> int:
        return self.timesteps_1000[int(k / NSTEPS * len(self.timesteps_1000))]

    def prefix_timesteps(self, k: int, prefix_steps: int = NSTEPS) -> list[int]:
        """The m + 1 noise levels the prefix visits: the first is where it starts, the last where it ends.

        With prefix_steps = 50 these are exactly the 50-step schedule's first k timesteps followed by
        the level DDIM's k-th step lands on; fewer steps space m = round(k * N / 50) steps evenly
        between the same two ends.
        """
        start = self.timesteps_50[0]
        end = self.timesteps_50[k - 1] - self.stride_50
        m = max(1, round(k * prefix_steps / NSTEPS))
        return [int(t) for t in np.rint(np.linspace(start, end, m + 1))]


def ddim_step(latents_t: torch.Tensor, eps: torch.Tensor, alpha_t: torch.Tensor, alpha_prev: torch.Tensor) -> torch.Tensor:
    """One deterministic DDIM step (eta 0), written as diffusers' DDIMScheduler.step computes it."""
    pred_original = (latents_t - (1 - alpha_t) ** 0.5 * eps) / alpha_t ** 0.5
    return alpha_prev ** 0.5 * pred_original + (1 - alpha_prev) ** 0.5 * eps


def draw_training_latent(models, embeds_uncond_cond: torch.Tensor, resolution: int,
                         prefix_steps: int = NSTEPS) -> tuple[torch.Tensor, int]:
    """(z_k, t) of one iteration: k ~ U{1..48}, z_T ~ N(0, I) * init sigma, the prefix with the trained weights."""
    k = int(torch.randint(1, NSTEPS - 1, (1,)).item())
    latents_T = torch.randn(models.latent_shape(resolution)).to(models.device) * models.times.init_noise_sigma
    latents_k = partial_denoise(models.eps, latents_T, embeds_uncond_cond, models.times, k, prefix_steps)
    return latents_k, models.times.training_timestep(k)


@torch.no_grad()
def partial_denoise(predict, latents_T: torch.Tensor, embeds_uncond_cond: torch.Tensor,
                    times: DDIMTimes, k: int, prefix_steps: int = NSTEPS) -> torch.Tensor:
    """z_k: the prefix from `latents_T` with guidance 3, `predict(latents, t, embeds)` giving eps.

    `embeds_uncond_cond` is [2, L, D]: the empty prompt's embedding, then the erase prompt's.
    """
    levels = times.prefix_timesteps(k, prefix_steps)
    latents = latents_T
    for t, t_prev in zip(levels[:-1], levels[1:]):
        eps_uncond, eps_cond = predict(torch.cat([latents, latents]), t, embeds_uncond_cond).chunk(2)
        eps = eps_uncond + PREFIX_GUIDANCE * (eps_cond - eps_uncond)
        latents = ddim_step(latents, eps, times.alpha(t), times.alpha(t_prev))
    return latents
