"""The models an erase run trains, and the few ways the loops call them.

The UNet is loaded once in float32 (training weights); `--dtype fp16/bf16` only turns on autocast.
Frozen predictions reuse the same UNet with the trainable weights swapped for a snapshot
(`torch.func.functional_call`), so only the trained subset is ever held twice.

Text conditionings ("embeds") are plain [B, L, D] tensors for every model family, so stages can
concatenate, expand and slice them freely. For SDXL the UNet also needs the second encoder's
pooled embedding: it rides along as one extra last row (zero-padded to D) and `condition` splits
it off, together with the size/crop time ids, right before every UNet call.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.func import functional_call

from recare_cli.erase.denoise import DDIMTimes
from recare_cli.erase.traced import UNetTraces

AUTOCAST = {"fp16": "float16", "bf16": "bfloat16"}


class ForwardCounter:
    """Counts UNet forward passes in images (a batch of 4 counts 4), for the benchmark.

    The module's calls count themselves (a hook); a trace's calls bypass the module, so `eps`
    counts them (`add`), and the module's one run while a trace is taken does not count (`paused`).
    """

    def __init__(self, unet):
        self.images = 0
        self._paused = False
        unet.register_forward_pre_hook(self._count, with_kwargs=True)

    def add(self, sample: torch.Tensor) -> None:
        self.images += int(sample.shape[0])

    def _count(self, module, args, kwargs):
        if not self._paused:
            self.add(args[0] if args else kwargs["sample"])

    @contextlib.contextmanager
    def paused(self):
        self._paused = True
        try:
            yield
        finally:
            self._paused = False


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
    text_encoder_2: torch.nn.Module | None = None  # SDXL's second (OpenCLIP-bigG) encoder; None for SD 1.x/2.x
    tokenizer_2: object = None
    traces: UNetTraces | None = None  # fp32 calls on a CPU, traced (Python hooks on the UNet skip them)
    _embeds: dict = field(default_factory=dict)

    @classmethod
    def from_pipeline(cls, pipe, device: str, autocast_dtype=None) -> "EraseModels":
        from diffusers import DDIMScheduler

        scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        text_encoder_2 = getattr(pipe, "text_encoder_2", None)
        for module in (pipe.unet, pipe.vae, pipe.text_encoder, text_encoder_2):
            if module is not None:
                module.requires_grad_(False)
                module.eval()
        counter = ForwardCounter(pipe.unet)
        traces = UNetTraces(pipe.unet, counter.paused) if UNetTraces.wanted(device) else None
        return cls(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, scheduler, DDIMTimes(scheduler),
                   device, autocast_dtype, counter, pipe, text_encoder_2, getattr(pipe, "tokenizer_2", None), traces)

    @property
    def text_encoders(self) -> list:
        """(text encoder, tokenizer) pairs: one for SD 1.x/2.x, two for SDXL."""
        pairs = [(self.text_encoder, self.tokenizer)]
        return pairs + [(self.text_encoder_2, self.tokenizer_2)] if self.text_encoder_2 is not None else pairs

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

    def vae_autocast(self):
        """SDXL's VAE overflows in fp16 (its config says force_upcast): it always runs in float32."""
        if getattr(self.vae.config, "force_upcast", False):
            return contextlib.nullcontext()
        return self.autocast()

    def token_ids(self, prompts: list[str], tokenizer=None) -> torch.Tensor:
        tokenizer = self.tokenizer if tokenizer is None else tokenizer
        return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids.to(self.device)

    def encode(self, prompts: list[str], rows: list[tuple] | None = None) -> torch.Tensor:
        """Text conditioning, [len(prompts), L, D]: SD's last hidden states; SDXL's as its pipeline builds them.

        `rows` replaces some token-embedding rows of each text encoder for this call (textual
        inversion trains one): see `replaced_rows`; gradients flow into them.
        """
        return self.encode_ids([self.token_ids(prompts, tokenizer) for _, tokenizer in self.text_encoders], rows)

    def encode_ids(self, token_ids: list[torch.Tensor], rows: list[tuple] | None = None) -> torch.Tensor:
        """`encode` of prompts already tokenized: [B, L] ids for each text encoder (each its own padding).

        `rows[i]` is `(slot_ids [K], values [K, D_i])` for the i-th encoder: wherever a prompt has
        `slot_ids[j]`, that encoder embeds it as `values[j]`.
        """
        sdxl = self.text_encoder_2 is not None
        outputs = []
        for i, ((encoder, _), ids) in enumerate(zip(self.text_encoders, token_ids, strict=True)):
            swap = replaced_rows(encoder, ids, *rows[i]) if rows is not None else contextlib.nullcontext()
            with swap:
                outputs.append(encoder(ids, output_hidden_states=sdxl))
        if not sdxl:
            return outputs[0][0]
        # SDXL conditions on both encoders' penultimate layers side by side, and on the second's
        # pooled, projected embedding (StableDiffusionXLPipeline.encode_prompt).
        hidden = torch.cat([out.hidden_states[-2] for out in outputs], dim=-1)
        pooled = outputs[1].text_embeds
        pooled_row = F.pad(pooled, (0, hidden.shape[-1] - pooled.shape[-1])).unsqueeze(1)
        return torch.cat([hidden, pooled_row], dim=1)

    @torch.no_grad()
    def embed(self, prompts: list[str]) -> torch.Tensor:
        """`encode` with the frozen encoders, cached until a token is learned."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._embeds]
        if missing:
            self._embeds.update(zip(missing, self.encode(missing)))
        return torch.stack([self._embeds[p] for p in prompts])

    def cross_attention_context(self, embeds: torch.Tensor) -> torch.Tensor:
        """What the UNet's cross-attention reads of `embeds`, [B, L, D]: SDXL's without the pooled row."""
        return embeds if self.text_encoder_2 is None else embeds[:, :-1]

    def condition(self, latents: torch.Tensor, embeds: torch.Tensor) -> tuple[torch.Tensor, dict | None]:
        """(encoder_hidden_states, added_cond_kwargs) of one UNet call, for any model family.

        SDXL's UNet also takes the pooled text embedding and the time ids: original size, crop
        top-left, target size, as its pipeline sets them by default (the rendered size, no crop).
        """
        prompt_embeds = self.cross_attention_context(embeds)
        if self.text_encoder_2 is None:
            return prompt_embeds, None
        pooled = embeds[:, -1, : self.text_encoder_2.config.projection_dim]
        height, width = (side * self.vae_factor for side in latents.shape[-2:])
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=prompt_embeds.dtype,
                                device=prompt_embeds.device).expand(len(prompt_embeds), -1)
        return prompt_embeds, {"text_embeds": pooled, "time_ids": time_ids}

    def forget_embeddings(self) -> None:
        """The text encoder changed (a token was learned): cached prompt embeddings are stale."""
        self._embeds.clear()

    def eps(self, latents: torch.Tensor, t: int | torch.Tensor, embeds: torch.Tensor,
            weights: dict | None = None) -> torch.Tensor:
        """The UNet's output (noise, or v: the scheduler's prediction_type); `weights` replaces some
        parameters (a frozen snapshot) for this call."""
        timestep = t if isinstance(t, torch.Tensor) else torch.tensor(t, device=self.device)
        prompt_embeds, added_cond_kwargs = self.condition(latents, embeds)
        conditioning = {"encoder_hidden_states": prompt_embeds, "added_cond_kwargs": added_cond_kwargs}
        if self.traces is not None and self.autocast_dtype is None:
            out = self.traces(latents, timestep, prompt_embeds, added_cond_kwargs, weights)
            if out is not None:
                if self.counter is not None:
                    self.counter.add(latents)
                return out.float()
        with self.autocast():
            if weights is None:
                out = self.unet(latents, timestep, **conditioning).sample
            else:
                out = functional_call(self.unet, weights, (latents, timestep), conditioning, strict=False).sample
        return out.float()

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def latent_shape(self, resolution: int) -> tuple[int, int, int, int]:
        return (1, self.unet.config.in_channels, resolution // self.vae_factor, resolution // self.vae_factor)

    @property
    def vae_scale(self) -> float:
        return float(self.vae.config.scaling_factor)


def regression_step(models: EraseModels, optimizer, latents: torch.Tensor, t, embeds: torch.Tensor,
                    eps_target: torch.Tensor) -> torch.Tensor:
    """One optimizer step pulling the trained prediction for `embeds` towards `eps_target` (MSE); the loss."""
    import torch.nn.functional as F

    optimizer.zero_grad(set_to_none=True)
    eps_theta = models.eps(latents, t, embeds)
    loss = F.mse_loss(eps_theta, eps_target)
    loss.backward()
    optimizer.step()
    return loss


@contextlib.contextmanager
def no_grad_into(module: torch.nn.Module):
    """Inside: no parameter of `module` asks for a gradient; after: each asks as it did before.

    For a stage that trains something else through `module` (the inversion's token row through the
    UNet): backward then stops at the activations instead of filling a gradient for every
    weight an erase stage left trainable -- same result, one weight-gradient pass less.
    """
    wanted = [p for p in module.parameters() if p.requires_grad]
    for p in wanted:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in wanted:
            p.requires_grad_(True)


@contextlib.contextmanager
def replaced_rows(text_encoder, token_ids: torch.Tensor, slot_ids: torch.Tensor, values: torch.Tensor):
    """Inside: `text_encoder` embeds each id of `slot_ids` in `token_ids` as the matching row of `values`.

    The swap happens on the looked-up embeddings, not in the matrix: a copy of the 49,408-row
    matrix per call (and its dense gradient) would cost more than the text encoder itself.
    """
    match = token_ids.unsqueeze(-1) == slot_ids.to(token_ids.device)  # [B, L, K]
    hit = match.any(dim=-1, keepdim=True)
    which = match.int().argmax(dim=-1)

    def swap(module, args, embedded):
        return torch.where(hit, values[which].to(embedded.dtype), embedded)

    handle = text_encoder.get_input_embeddings().register_forward_hook(swap)
    try:
        yield
    finally:
        handle.remove()


def snapshot(params: dict) -> dict:
    """Detached copies of parameters: the frozen weights of a stage."""
    return {name: p.detach().clone() for name, p in params.items()}


@torch.no_grad()
def load_into(params: dict, values: dict) -> None:
    for name, p in params.items():
        p.copy_(values[name].to(p.device, p.dtype))
