"""The models an erase run trains, and the few ways the loops call them.

The UNet is loaded once in float32 (training weights); `--dtype fp16/bf16` only turns on autocast.
Frozen predictions reuse the same UNet with the trainable weights swapped for a snapshot
(`torch.func.functional_call`), so only the trained subset is ever held twice.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch.func import functional_call

from recare_cli.erase.denoise import DDIMTimes

AUTOCAST = {"fp16": "float16", "bf16": "bfloat16"}


class ForwardCounter:
    """Counts UNet forward passes in images (a batch of 4 counts 4), for the benchmark."""

    def __init__(self, unet):
        self.images = 0
        unet.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        self.images += int(sample.shape[0])


@dataclass
class EraseModels:
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler: object  # DDIM, from the model's scheduler config
    times: DDIMTimes
    device: str
    autocast_dtype: torch.dtype | None = None
    counter: ForwardCounter | None = None
    pipe: object = None  # the pipeline the models came from, to render training images with
    _embeds: dict = field(default_factory=dict)

    @classmethod
    def from_pipeline(cls, pipe, device: str, autocast_dtype=None) -> "EraseModels":
        from diffusers import DDIMScheduler

        scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        for module in (pipe.unet, pipe.vae, pipe.text_encoder):
            module.requires_grad_(False)
        pipe.text_encoder.eval()
        pipe.vae.eval()
        return cls(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, scheduler, DDIMTimes(scheduler),
                   device, autocast_dtype, ForwardCounter(pipe.unet), pipe)

    @classmethod
    def load(cls, runtime, unet: str | None = None) -> "EraseModels":
        """`runtime`'s model (with `unet`'s weights) in float32: --dtype fp16/bf16 selects autocast for the forwards."""
        from dataclasses import replace

        device = runtime.torch_device()
        autocast = AUTOCAST.get(runtime.dtype)
        pipe, _, _ = replace(runtime, dtype="fp32").pipeline(unet, device=device)
        return cls.from_pipeline(pipe, device, getattr(torch, autocast) if autocast else None)

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=torch.device(self.device).type, dtype=self.autocast_dtype)

    def token_ids(self, prompts: list[str]) -> torch.Tensor:
        return self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids.to(self.device)

    @torch.no_grad()
    def embed(self, prompts: list[str]) -> torch.Tensor:
        """Text-encoder last hidden states, [len(prompts), L, D]; cached while the encoder is frozen."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._embeds]
        if missing:
            hidden = self.text_encoder(self.token_ids(missing))[0]
            self._embeds.update(zip(missing, hidden))
        return torch.stack([self._embeds[p] for p in prompts])

    def forget_embeddings(self) -> None:
        """The text encoder changed (a token was learned): cached prompt embeddings are stale."""
        self._embeds.clear()

    def eps(self, latents: torch.Tensor, t: int | torch.Tensor, embeds: torch.Tensor,
            weights: dict | None = None) -> torch.Tensor:
        """The UNet's output (noise, or v: the scheduler's prediction_type); `weights` replaces some
        parameters (a frozen snapshot) for this call."""
        timestep = t if isinstance(t, torch.Tensor) else torch.tensor(t, device=self.device)
        with self.autocast():
            if weights is None:
                out = self.unet(latents, timestep, encoder_hidden_states=embeds).sample
            else:
                out = functional_call(self.unet, weights, (latents, timestep),
                                      {"encoder_hidden_states": embeds}, strict=False).sample
        return out.float()

    def latent_shape(self, resolution: int) -> tuple[int, int, int, int]:
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        return (1, self.unet.config.in_channels, resolution // factor, resolution // factor)

    @property
    def vae_scale(self) -> float:
        return float(self.vae.config.scaling_factor)


def snapshot(params: dict) -> dict:
    """Detached copies of parameters: the frozen weights of a stage."""
    return {name: p.detach().clone() for name, p in params.items()}


@torch.no_grad()
def load_into(params: dict, values: dict) -> None:
    for name, p in params.items():
        p.copy_(values[name].to(p.device, p.dtype))
