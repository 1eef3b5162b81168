"""UnlearnDiffAtk (Zhang et al., ECCV 2024): adversarial prefix tokens found with the model's own denoising loss.

Followed: OPTML-Group/Diffusion-MU-Attack, `src/attackers/text_grad_.py` (the attacker),
`src/tasks/classifier_.py` (`get_loss`, `img2latent`) and `configs/*/text_grad_*_classifier.json`
(the published settings): k = 5 prefix tokens (`prefix_k`), 40 iterations, Adam lr 0.01 with
weight decay 0.1. Each prefix position holds weights over the whole vocabulary, initialised
uniform and kept on the probability simplex; each step samples one token per position from them
(straight-through gradient, clipped to [-1, 1]), and the loss is the MSE between the attacked
UNet's noise prediction and the noise, on noised latents of the target image (the base model's
image of the same prompt and seed, VAE mean times the scaling factor). The attack's prompt is the
most likely token of each position, decoded, before the prompt.

Where recare differs, on purpose:
- Timesteps. The reference runs its 40 iterations at each of 50 timesteps (10, 30, ..., 990) in
  turn and, after each block, renders an image and stops once its classifier sees the concept. In
  recare the run's metrics judge images after the search, so there is no success test inside it:
  the 40 steps each draw one of those 50 timesteps.
- The projection onto the simplex is the exact one, by sorting (Duchi et al., 2008); the
  reference's bisection reaches the same point to within 1e-5.
- The vocabulary leaves out special tokens and tokens an erase run added: the prompt must be text
  that a tokenizer without the run's tokens reads. On SDXL (the reference is SD 1.4 only) it is the
  ids every tokenizer of the model shares, and each prediction gets the pooled text embedding and
  time ids, as erase gives them.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from recare_cli.attacks import Adversarial, AttackContext, AttackTarget
from recare_cli.errors import RecareError, UsageError

DEFAULT_TOKENS = 5
DEFAULT_STEPS = 40
DEFAULT_LR = 0.01
WEIGHT_DECAY = 0.1
TIMESTEPS = tuple(range(10, 1000, 20))  # the reference's sampled_t (T = 1000, n_samples = 50)


def project_to_simplex(weights: torch.Tensor) -> torch.Tensor:
    """Each row's Euclidean projection onto {w >= 0, sum(w) = 1}."""
    sorted_desc = weights.sort(dim=-1, descending=True).values
    cumulative = sorted_desc.cumsum(dim=-1) - 1
    rank = torch.arange(1, weights.shape[-1] + 1, device=weights.device, dtype=weights.dtype)
    support = (sorted_desc - cumulative / rank > 0).sum(dim=-1, keepdim=True)
    threshold = cumulative.gather(-1, support - 1) / support.to(weights.dtype)
    return (weights - threshold).clamp(min=0)


class SampledOneHot(torch.autograd.Function):
    """A token drawn from each row's weights, as one-hot rows; the gradient passes straight through, clipped."""

    @staticmethod
    def forward(ctx, weights: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        drawn = torch.multinomial(weights.detach().float().cpu(), 1, generator=generator).squeeze(1)
        return F.one_hot(drawn.to(weights.device), weights.shape[-1]).to(weights.dtype)

    @staticmethod
    def backward(ctx, grad_one_hot):
        return F.hardtanh(grad_one_hot), None


class PrefixPrompt:
    """The attacked model's conditioning for `<bos> prefix prompt <eos> <pad>...`, the prefix given as
    weights over `vocabulary` (one row per prefix position).

    The prefix sits in k slots: vocabulary ids the prompt does not use, whose rows in each text
    encoder's embedding matrix are replaced by the weighted vocabulary rows inside the forward
    (`EraseModels.encode_ids`' `rows`, as recare's textual inversion does), so
    the encoders run exactly as for text. Slots are real ids below end-of-text: an encoder that
    pools at the highest id (SDXL's OpenCLIP-bigG config says eos_token_id 2) pools at end-of-text,
    as it does for the decoded prompt. SDXL's two tokenizers share one vocabulary: the same weights
    pick each encoder's own rows, and the conditioning carries the pooled embedding and, in
    `EraseModels.eps`, the time ids, as for any prompt.
    """

    def __init__(self, models, prompt: str, tokens: int, vocabulary: torch.Tensor):
        tokenizer = models.tokenizer
        self.models = models
        self.vocabulary = vocabulary
        room = tokenizer.model_max_length - 2 - tokens
        if room < 1:
            raise UsageError(f"--attack-tokens {tokens} leaves no room for the prompt in this text encoder's "
                             f"{tokenizer.model_max_length} positions", hint="pass fewer --attack-tokens")
        prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids[:room]
        used = set(prompt_ids)
        self.slots = torch.tensor([i for i in vocabulary.tolist() if i not in used][-tokens:], device=models.device)
        self.vocabulary_rows = [encoder.get_input_embeddings().weight.detach()[vocabulary]
                                for encoder, _ in models.text_encoders]
        self.token_ids = []
        for _, each in models.text_encoders:
            ids = [each.bos_token_id, *self.slots.tolist(), *prompt_ids, each.eos_token_id]
            ids += [each.pad_token_id] * (each.model_max_length - len(ids))
            self.token_ids.append(torch.tensor([ids], device=models.device))

    def __call__(self, weights: torch.Tensor) -> torch.Tensor:
        slot_rows = [(self.slots, weights.to(rows.dtype) @ rows) for rows in self.vocabulary_rows]
        with self.models.autocast():
            return self.models.encode_ids(self.token_ids, slot_rows).float()


@torch.no_grad()
def target_latents(models, image_path) -> torch.Tensor:
    """The target image's VAE latent mean times the scaling factor (the reference's img2latent)."""
    from PIL import Image

    try:
        with Image.open(image_path) as image:
            pixels = np.asarray(image.convert("RGB")).astype(np.float32) / 127.5 - 1.0
    except OSError as exc:
        raise RecareError(f"cannot read the target image '{image_path}': {exc}") from None
    pixels = torch.from_numpy(pixels).permute(2, 0, 1).unsqueeze(0).to(models.device)
    with models.vae_autocast():
        return models.vae.encode(pixels).latent_dist.mean.float() * models.vae_scale


def denoising_loss(models, embeds: torch.Tensor, latents_0: torch.Tensor, timestep: int,
                   noise: torch.Tensor) -> torch.Tensor:
    t = torch.tensor([timestep], device=models.device)
    latents_t = models.scheduler.add_noise(latents_0, noise, t)
    return F.mse_loss(models.eps(latents_t, t, embeds), noise)


def search(models, prompt: PrefixPrompt, latents_0: torch.Tensor, steps: int, lr: float, seed: int,
           task) -> tuple[list[int], list[float]]:
    """The prefix's token ids and the loss of every step."""
    generator = torch.Generator().manual_seed(seed)
    vocabulary = prompt.vocabulary
    weights = torch.full((len(prompt.slots), len(vocabulary)), 1.0 / len(vocabulary), device=models.device,
                         requires_grad=True)
    optimizer = torch.optim.Adam([weights], lr=lr, weight_decay=WEIGHT_DECAY)
    losses = []
    for _ in range(steps):
        timestep = TIMESTEPS[int(torch.randint(len(TIMESTEPS), (1,), generator=generator))]
        noise = torch.randn(latents_0.shape, generator=generator).to(models.device)

        optimizer.zero_grad(set_to_none=True)
        loss = denoising_loss(models, prompt(SampledOneHot.apply(weights, generator)), latents_0, timestep, noise)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            weights.copy_(project_to_simplex(weights))
        losses.append(float(loss.detach()))
        task.advance(1, loss=losses[-1])
    return vocabulary[weights.detach().argmax(dim=-1)].tolist(), losses


def run(ctx: AttackContext, target: AttackTarget) -> Adversarial:
    tokens = int(ctx.option("tokens", DEFAULT_TOKENS))
    steps = int(ctx.option("steps", DEFAULT_STEPS))
    if target.target_image is None:
        raise RecareError(f"unlearndiffatk has no target image for '{target.prompt}' seed {target.seed}")
    models = ctx.models
    vocabulary = ctx.shared("vocabulary", ctx.vocabulary)
    prompt = PrefixPrompt(models, target.prompt, tokens, vocabulary)
    latents_0 = target_latents(models, target.target_image)
    with ctx.progress(steps) as task:
        prefix_ids, losses = search(models, prompt, latents_0, steps, float(ctx.option("lr", DEFAULT_LR)),
                                    ctx.seed(target), task)
    prefix = models.tokenizer.decode(prefix_ids).strip()
    return Adversarial(f"{prefix} {target.prompt}", losses, token_ids=prefix_ids)
