"""The partial-denoising prefix both erase objectives start from (recare-method.md §2).

Each iteration draws k in 1..48, runs DDIM (eta 0) from pure noise for the first k steps of a
50-step schedule with guidance 3 on the erase prompt, and trains at the 1000-step schedule's
timestep at the same fraction of the trajectory. `prefix_steps` < 50 reaches the same noise level
with fewer, larger DDIM steps (perf-notes.md); 50 reproduces the spec step for step.

The UNet's output is what the scheduler config says it predicts (`prediction_type`): noise for SD
1.x and SD 2.x-base, v for SD 2.x 768 models. Guidance combines outputs in that space, and each
DDIM step converts the guided output to (x_0, noise) exactly as diffusers' DDIMScheduler does.
"""

from __future__ import annotations

import numpy as np
import torch

from recare_cli.errors import RecareError

NSTEPS = 50
PREFIX_GUIDANCE = 3.0
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


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
        self.prediction_type = ddim.config.prediction_type
        if self.prediction_type not in PREDICTION_TYPES:
            raise RecareError(f"the model's scheduler predicts '{self.prediction_type}', which recare cannot train",
                              hint=f"models predicting {' or '.join(PREDICTION_TYPES)} are supported")

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


def ddim_step(latents_t: torch.Tensor, model_output: torch.Tensor, alpha_t: torch.Tensor,
              alpha_prev: torch.Tensor, prediction_type: str = "epsilon") -> torch.Tensor:
    """One deterministic DDIM step (eta 0), written as diffusers' DDIMScheduler.step computes it."""
    if prediction_type == "epsilon":
        eps = model_output
        pred_original = (latents_t - (1 - alpha_t) ** 0.5 * eps) / alpha_t ** 0.5
    elif prediction_type == "v_prediction":
        pred_original = alpha_t ** 0.5 * latents_t - (1 - alpha_t) ** 0.5 * model_output
        eps = alpha_t ** 0.5 * model_output + (1 - alpha_t) ** 0.5 * latents_t
    else:  # "sample": the output is x_0 itself
        pred_original = model_output
        eps = (latents_t - alpha_t ** 0.5 * pred_original) / (1 - alpha_t) ** 0.5
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
    """z_k: the prefix from `latents_T` with guidance 3, `predict(latents, t, embeds)` giving the model's output.

    `embeds_uncond_cond` is [2, L, D]: the empty prompt's embedding, then the erase prompt's.
    """
    levels = times.prefix_timesteps(k, prefix_steps)
    latents = latents_T
    for t, t_prev in zip(levels[:-1], levels[1:]):
        out_uncond, out_cond = predict(torch.cat([latents, latents]), t, embeds_uncond_cond).chunk(2)
        # Guidance in the output's own space, as diffusers' pipelines apply it: for a fixed latent
        # and t, noise, v and x_0 are affine functions of each other, and a weighted sum whose
        # weights add up to 1 commutes with any affine map, so this is the same guided step in each.
        guided = out_uncond + PREFIX_GUIDANCE * (out_cond - out_uncond)
        latents = ddim_step(latents, guided, times.alpha(t), times.alpha(t_prev), times.prediction_type)
    return latents
