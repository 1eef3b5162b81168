"""Guidance-normalised targets (recare-method.md §3): the adaptive-projected-guidance update.

Every tensor is [B, C, H, W]; projections are per sample over (C, H, W), in float64 as the
reference computes them, and returned in the input dtype.

The `eps_*` tensors are the UNet's outputs in whatever it predicts (noise, or v for SD 2.x 768
models), and the targets stay in that space. For a fixed latent and timestep, v = eps / sqrt(a) -
sqrt((1 - a) / a) x_t is an affine function of the noise, and every target here is a weighted sum
of outputs whose weights add up to 1, which commutes with an affine map: with the default knobs
(eta 1, no clipping, no momentum) the v-space target is exactly the v of the noise-space target.
Only the optional APG projection onto `p` (eta != 1) differs between spaces, as it does in every
pipeline applying APG to the model's raw output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GuidanceKnobs:
    """The APG options the reference exposes; the defaults make `update(d, p) == d`."""

    eta: float = 1.0
    norm_threshold: float = 0.0  # 0 = off
    momentum: float = 0.0  # 0 = off


class MomentumBuffer:
    """Running sum `avg <- d + momentum * avg` of one condition's guidance direction across steps."""

    def __init__(self, momentum: float):
        self.momentum = momentum
        self.running_average: torch.Tensor | None = None

    def update(self, direction: torch.Tensor) -> torch.Tensor:
        if self.running_average is None:
            self.running_average = direction
        else:
            self.running_average = direction + self.momentum * self.running_average
        return self.running_average


def proj(d: torch.Tensor, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(part of `d` parallel to `p`, the orthogonal rest)."""
    dtype = d.dtype
    d64, p64 = d.double(), p.double()
    p_hat = p64 / p64.flatten(1).norm(dim=1).clamp_min(1e-30).view(-1, 1, 1, 1)
    d_par = (d64 * p_hat).sum(dim=(1, 2, 3), keepdim=True) * p_hat
    return d_par.to(dtype), (d64 - d_par).to(dtype)


def update(d: torch.Tensor, p: torch.Tensor, knobs: GuidanceKnobs = GuidanceKnobs(),
           buffer: MomentumBuffer | None = None) -> torch.Tensor:
    """`d_orth + eta * d_par`, after optional momentum and norm clipping of `d`."""
    if buffer is not None:
        d = buffer.update(d)
    if knobs.norm_threshold > 0:
        norm = d.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        d = d * torch.clamp(knobs.norm_threshold / norm, max=1.0)
    d_par, d_orth = proj(d, p)
    return d_orth + knobs.eta * d_par


def single_negative_target(eps_pos: torch.Tensor, eps_neu: torch.Tensor, negative_guidance: float,
                           knobs: GuidanceKnobs = GuidanceKnobs(),
                           buffer: MomentumBuffer | None = None) -> torch.Tensor:
    """Stage 1: `eps_pos - (g - 1) * update(eps_pos - eps_neu, eps_pos)`; g = 2 gives `eps_neu`."""
    return eps_pos - (negative_guidance - 1) * update(eps_pos - eps_neu, eps_pos, knobs, buffer)


def compositional_target(eps_conds: list[torch.Tensor], eps_neu: torch.Tensor, scales: list[float],
                         knobs: GuidanceKnobs = GuidanceKnobs(),
                         buffers: list[MomentumBuffer] | None = None) -> torch.Tensor:
    """Stage 2: `eps_neu + mean_{s>0} (s-1) d_j + mean_{s<0} (s-1) d_j`."""
    positive, negative = [], []
    for j, (eps_cond, scale) in enumerate(zip(eps_conds, scales, strict=True)):
        d_j = update(eps_cond - eps_neu, eps_cond, knobs, buffers[j] if buffers else None)
        (positive if scale > 0 else negative).append((scale - 1) * d_j)
    target = eps_neu
    for part in (positive, negative):
        if part:
            target = target + torch.stack(part).mean(dim=0)
    return target
