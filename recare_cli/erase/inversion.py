"""Stage 1, step 2: textual inversion of a new adversarial token (recare-method.md §4.2).

Only the new token's embedding row trains. It is held as its own parameter and put in place of
the token's looked-up embedding inside the forward (`replaced_rows`), so every other row is never
touched -- the same result as the reference's "train the whole matrix, restore the other rows",
since AdamW updates each element independently, without a 49,408-row gradient each step. The
UNet weights an erase stage trains are switched off for the inversion, so backward never computes
their gradients.
SDXL has two text encoders: the token gets a row in each and both train together, as diffusers'
SDXL textual-inversion example does; a token's embedding is then both rows end to end
(`split_rows` cuts it per encoder).
VAE latent distributions depend only on (image, flip) and are computed once each.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from recare_cli.erase.context import EraseModels, no_grad_into
from recare_cli.erase.loop import StageLoop
from recare_cli.errors import RecareError, UsageError


@dataclass(frozen=True)
class InversionSettings:
    steps: int = 3000
    lr: float = 5e-3  # times the batch size (1), as the reference's scale_lr does
    resolution: int = 512
    center_crop: bool = False


# tokens ------------------------------------------------------------------------------------

def initializer_id(tokenizer, initializer: str) -> int:
    ids = tokenizer.encode(initializer, add_special_tokens=False)
    if len(ids) != 1:
        pieces = tokenizer.convert_ids_to_tokens(ids)
        raise UsageError(
            f"--initializer-token '{initializer}' is {len(ids)} tokens for this tokenizer ({' '.join(pieces) or 'none'}), not one",
            hint="pick a single common word such as person, art or object",
        )
    return ids[0]


def new_token_name(seed: int, round_index: int, taken) -> str:
    """A fresh `token_xxxxxxxx` per round, reproducible from the seed, never one already taken."""
    rng = random.Random(f"recare-token-{seed}-{round_index}")
    while True:
        name = "token_" + "".join(rng.choices(string.ascii_lowercase + string.digits, k=8))
        if name not in taken:
            return name


def split_rows(models: EraseModels, embedding: torch.Tensor) -> list[torch.Tensor]:
    """A token's embedding, one row per text encoder (SDXL: CLIP-L's, then OpenCLIP-bigG's)."""
    widths = [encoder.get_input_embeddings().weight.shape[1] for encoder, _ in models.text_encoders]
    return list(embedding.reshape(-1).split(widths))


def add_token(models: EraseModels, name: str, embedding: torch.Tensor) -> int:
    """Add `name` to every tokenizer and its row(s) to every text encoder; return its id (the same in each)."""
    ids = set()
    for (encoder, tokenizer), row in zip(models.text_encoders, split_rows(models, embedding), strict=True):
        if tokenizer.add_tokens([name]) != 1:
            raise RecareError(f"token '{name}' already exists in the tokenizer")
        encoder.resize_token_embeddings(len(tokenizer))
        token_id = tokenizer.convert_tokens_to_ids(name)
        with torch.no_grad():
            encoder.get_input_embeddings().weight[token_id] = row.to(models.device)
        ids.add(token_id)
    if len(ids) != 1:
        raise RecareError(f"token '{name}' got different ids in the model's two tokenizers: {sorted(ids)}",
                          hint="the tokenizers of this model do not share one vocabulary")
    models.forget_embeddings()
    return ids.pop()


def token_embedding(models: EraseModels, token_id: int) -> torch.Tensor:
    """The embedding of `token_id`: its row in every text encoder, end to end."""
    return torch.cat([encoder.get_input_embeddings().weight[token_id].detach() for encoder, _ in models.text_encoders])


# images --------------------------------------------------------------------------------------

def round_subset(images: list[Path], rounds: int, round_index: int) -> list[Path]:
    """Chunk `round_index` of `rounds` consecutive chunks of max(1, N // rounds), wrapping around."""
    size = max(1, len(images) // rounds)
    return [images[(round_index * size + j) % len(images)] for j in range(size)]


def load_pixels(path: Path, resolution: int, center_crop: bool) -> torch.Tensor:
    """[3, H, W] in [-1, 1], resized bicubically (after an optional centre crop) as the reference does."""
    import numpy as np
    from PIL import Image

    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
    except OSError as exc:
        raise RecareError(f"cannot read training image '{path}': {exc}") from None
    if center_crop:
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image = image.crop((left, top, left + side, top + side))
    image = image.resize((resolution, resolution), resample=Image.Resampling.BICUBIC)
    array = np.asarray(image).astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)


class LatentCache:
    """VAE latent distribution (mean, std) of each (image, flip), encoded on first use."""

    def __init__(self, models: EraseModels, images: list[Path], settings: InversionSettings):
        self.models = models
        self.images = images
        self.settings = settings
        self._pixels: dict[int, torch.Tensor] = {}
        self._dists: dict[tuple[int, bool], tuple[torch.Tensor, torch.Tensor]] = {}

    @torch.no_grad()
    def distribution(self, index: int, flip: bool) -> tuple[torch.Tensor, torch.Tensor]:
        key = (index, flip)
        if key not in self._dists:
            if index not in self._pixels:
                self._pixels[index] = load_pixels(self.images[index], self.settings.resolution, self.settings.center_crop)
            pixels = self._pixels[index].flip(-1) if flip else self._pixels[index]
            # A channels-last input makes the encoder's full-resolution convolutions 15-30% faster on
            # a CPU (bench/erase.py; the same result to ~1e-5); the UNet then gets contiguous latents.
            batch = pixels.unsqueeze(0).to(self.models.device).contiguous(memory_format=torch.channels_last)
            with self.models.vae_autocast():
                dist = self.models.vae.encode(batch).latent_dist
            self._dists[key] = (dist.mean.float().contiguous(), dist.std.float().contiguous())
        return self._dists[key]


# the loop ------------------------------------------------------------------------------------

def epoch_order(seed: int, epoch: int, n: int) -> list[int]:
    """Every image once per epoch, shuffled; a function of (seed, epoch) so a resumed run sees the same order."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()


def training_target(scheduler, latents_0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet was trained to predict from `add_noise(latents_0, noise, t)`, as diffusers' training scripts set it."""
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents_0, noise, timesteps)
    if prediction_type == "sample":
        return latents_0
    return noise


def inversion_stage(models: EraseModels, token_id: int, images: list[Path], templates: tuple[str, ...],
                    token: str, settings: InversionSettings, loop: StageLoop) -> torch.Tensor:
    """Learn the embedding of `token` (already added, initialised); return it and write it in."""
    token_row = torch.nn.Parameter(token_embedding(models, token_id).clone())
    optimizer = torch.optim.AdamW([token_row], lr=settings.lr)
    latents_cache = LatentCache(models, images, settings)
    token_slot = torch.tensor([token_id], device=models.device)
    start = loop.resume({"token_row": token_row}, optimizer)
    with no_grad_into(models.unet):  # only the token row learns
        for step in range(start, settings.steps):
            index = epoch_order(loop.seed, step // len(images), len(images))[step % len(images)]
            flip = bool(torch.rand(()) < 0.5)
            caption = random.choice(templates).format(token)

            mean, std = latents_cache.distribution(index, flip)
            latents_0 = (mean + std * torch.randn_like(mean)) * models.vae_scale
            noise = torch.randn_like(latents_0)
            timesteps = torch.randint(0, 999, (1,), device=models.device)
            latents_t = models.scheduler.add_noise(latents_0, noise, timesteps)

            optimizer.zero_grad(set_to_none=True)
            rows = [(token_slot, row.unsqueeze(0)) for row in split_rows(models, token_row)]
            with models.autocast():
                embeds_caption = models.encode([caption], rows)
            prediction = models.eps(latents_t, timesteps, embeds_caption)
            loss = F.mse_loss(prediction, training_target(models.scheduler, latents_0, noise, timesteps))
            loss.backward()
            optimizer.step()
            loop.step_done(step, loss=loss)

    learned = token_row.detach().clone()
    with torch.no_grad():
        for (encoder, _), row in zip(models.text_encoders, split_rows(models, learned)):
            encoder.get_input_embeddings().weight[token_id] = row
    models.forget_embeddings()
    return learned
