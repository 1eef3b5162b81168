"""The UCE baseline (Gandikota et al., WACV 2024), recare-method.md §9: a closed-form edit, no training.

Followed: rohitgandikota/unified-concept-editing, `trainscripts/uce_sd_erase.py` (`UCE`). For
every cross-attention key and value projection W_old (d_out x d_text):

    W = (lam W_old + s_e sum_i (W_old g_i) c_i^T + s_p sum_j (W_old c_j) c_j^T)
        (lam I + s_e sum_i c_i c_i^T + s_p sum_j c_j c_j^T)^-1

c = the UNet's cross-attention context at the prompt's last token (before end-of-text, the
reference's `attention_mask.sum() - 2`), c_i the erase concepts, g_i their guides ("" for objects, "art" for
styles), c_j the preserve concepts. This is the minimiser of lam ||W - W_old||^2 +
s_e sum ||W c_i - W_old g_i||^2 + s_p sum ||W c_j - W_old c_j||^2. The context is what
erase conditions the UNet with (`EraseModels.embed`, `cross_attention_context`): the text
encoder's output for SD 1.x (768 wide) and SD 2.x (1024); for SDXL both encoders' penultimate
hidden states side by side (2048), as `StableDiffusionXLPipeline.encode_prompt` builds them. The
reference is SD-only; on SDXL recare keeps its code path and only the context changes (the pooled
embedding is no cross-attention input, so UCE leaves it alone).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from recare_cli.errors import RecareError, UsageError

# uce_sd_erase.py's --expand_prompts templates; styles are its 'art', everything else its 'object'.
EXPANSIONS = {
    "style": ("painting by {}", "art by {}", "artwork by {}", "picture by {}", "style of {}"),
    "object": ("image of {}", "photo of {}", "portrait of {}", "picture of {}", "painting of {}"),
}
GUIDES = {"style": "art"}  # any other type: "" (the unconditional prompt)


@dataclass(frozen=True)
class UceSettings:
    """uce_sd_erase.py's defaults: --erase_scale 1 --preserve_scale 1 --lamb 0.5 --expand_prompts false."""

    erase_scale: float = 1.0
    preserve_scale: float = 1.0
    lamb: float = 0.5
    expand: bool = False


def check_uce_request(request) -> None:
    if request.erase_from:
        raise UsageError("--erase-from is not an option of --method uce",
                         hint="UCE maps each concept to its guide: pass --guide PROMPT instead")
    if any(not word.strip() for word in request.preserve):
        raise UsageError("--preserve is empty", hint="name a concept to keep, or 'careset' for the CARE set's words")
    erased = {concept.strip().lower() for concept in request.concepts}
    kept = next((word for word in request.preserve if word.strip().lower() in erased), None)
    if kept is not None:
        raise UsageError(f"--preserve '{kept}' is also a --concept to erase",
                         hint="UCE cannot keep and erase one concept: preserve the concepts next to it")
    if request.guide is not None and request.guide.strip().lower() in erased:
        raise UsageError(f"--guide '{request.guide}' is the concept itself: the edit would change nothing",
                         hint="guide it to what should appear instead, e.g. '' (the default for objects) or 'art'")


def default_guide(concept_type: str) -> str:
    return GUIDES.get(concept_type, "")


def expanded(concepts: list[str], concept_type: str) -> list[str]:
    """Each concept followed by its five templated prompts (uce_sd_erase.py --expand_prompts true)."""
    templates = EXPANSIONS["style" if concept_type == "style" else "object"]
    return [prompt for c in concepts for prompt in (c, *(t.format(c) for t in templates))]


@torch.no_grad()
def text_features(models, prompts: list[str]) -> torch.Tensor:
    """c for each prompt, [N, d_text]: the UNet's cross-attention context at the prompt's last token.

    The one place UCE encodes text, through the erase conditioning: for SDXL, both encoders'
    penultimate states concatenated (the two tokenizers share one vocabulary, so the index is the same).
    """
    hidden = models.cross_attention_context(models.embed(prompts))  # [N, L, D]
    mask = models.tokenizer(prompts, padding="max_length", max_length=models.tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").attention_mask
    last = (mask.sum(dim=1) - 2).clamp_min(0).to(hidden.device)  # the token before end-of-text; "" -> start token
    return hidden[torch.arange(len(prompts), device=hidden.device), last].float()


def cross_attention_projections(unet) -> dict[str, torch.nn.Linear]:
    """Every cross-attention key/value projection, by module name (the reference's selection)."""
    return {name: module for name, module in unet.named_modules()
            if "attn2" in name and name.rsplit(".", 1)[-1] in ("to_k", "to_v")}


def uce_weight(w_old: torch.Tensor, erase_c: torch.Tensor, guide_c: torch.Tensor, preserve_c: torch.Tensor,
               settings: UceSettings) -> torch.Tensor:
    """The closed form for one projection, in float64; rows of the c tensors are concepts."""
    w = w_old.double()
    erase_c, guide_c, preserve_c = erase_c.double(), guide_c.double(), preserve_c.double()
    numerator = (settings.lamb * w + settings.erase_scale * (w @ guide_c.T) @ erase_c
                 + settings.preserve_scale * (w @ preserve_c.T) @ preserve_c)
    gram = (settings.lamb * torch.eye(w.shape[1], dtype=w.dtype, device=w.device)
            + settings.erase_scale * erase_c.T @ erase_c + settings.preserve_scale * preserve_c.T @ preserve_c)
    # numerator @ inv(gram), with gram symmetric positive definite: one solve instead of an inverse.
    return torch.linalg.solve(gram, numerator.T).T.to(w_old.dtype)


@torch.no_grad()
def uce_edit(models, concepts: list[str], concept_type: str, preserve: list[str], guide: str | None,
             settings: UceSettings) -> dict[str, torch.Tensor]:
    """Edit the UNet in place; return the new weights by parameter name."""
    erase = expanded(concepts, concept_type) if settings.expand else list(concepts)
    guide = default_guide(concept_type) if guide is None else guide
    erase_c = text_features(models, erase)
    guide_c = text_features(models, [guide]).expand(len(erase), -1)
    preserve_c = text_features(models, preserve) if preserve else erase_c.new_zeros((0, erase_c.shape[1]))
    projections = cross_attention_projections(models.unet)
    if not projections:
        raise RecareError("this UNet has no cross-attention key/value projections (attn2.to_k / attn2.to_v) to edit",
                          hint="UCE needs a Stable-Diffusion-style UNet")
    edited = {}
    for name, module in projections.items():
        if module.weight.shape[1] != erase_c.shape[1]:
            raise RecareError(f"{name} reads {module.weight.shape[1]}-wide text features, the text encoder(s) give "
                              f"{erase_c.shape[1]}", hint="the UNet and the text encoders come from different models")
        module.weight.copy_(uce_weight(module.weight, erase_c, guide_c, preserve_c, settings))
        edited[f"{name}.weight"] = module.weight.detach().clone()
    return edited
