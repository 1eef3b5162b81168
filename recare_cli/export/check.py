"""The reload check: what an export is compared with its source by, and how closely."""

from __future__ import annotations

from recare_cli.errors import RecareError
from recare_cli.models import is_sdxl

CHECK_FAILED_HINT = "rerun with --verbose; if it persists, report it with `recare --version`"

# Largest max |difference| allowed between the probe of an export and of its source (a noise
# prediction of unit scale). An fp32 export holds the source's exact values, so only kernel choice
# differs (PEFT adds B(A(x)) as its own matmul; measured up to 4e-6): 1e-4 is far above that and far
# below what one misplaced weight does (O(1)). Rounding weights to fp16 (11-bit mantissa) or bf16
# (8-bit) moved tiny-random's probe by 2.2e-3 and 1.6e-2; a deep SD UNet compounds rounding over
# more layers, so the tolerances leave about twenty times that.
TOLERANCE = {"fp32": 1e-4, "fp16": 5e-2, "bf16": 2.5e-1}
PROBE_SEED = 0
PROBE_TIMESTEP = 500
PROBE_TOKENS = 77
PROBE_MAX_SIZE = 32  # latent side: small keeps a real SD UNet's check cheap, still divisible by 8


def _torch_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def unet_probe(unet):
    """The UNet's fp32 noise prediction for a fixed latent, timestep and text: what exports are compared by."""
    import torch

    config = unet.config
    size = min(config.sample_size, PROBE_MAX_SIZE)
    generator = torch.Generator().manual_seed(PROBE_SEED)
    latents = torch.randn(1, config.in_channels, size, size, generator=generator)
    text_states = torch.randn(1, PROBE_TOKENS, config.cross_attention_dim, generator=generator)
    added_cond_kwargs = None
    if config.addition_embed_type == "text_time":  # SDXL: a pooled text embedding and size/crop time ids
        pooled_dim = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        side = 8.0 * size
        added_cond_kwargs = {"text_embeds": torch.randn(1, pooled_dim, generator=generator).to(unet.device),
                             "time_ids": torch.tensor([[side, side, 0.0, 0.0, side, side]], device=unet.device)}
    unet = unet.float()
    with torch.no_grad():
        eps = unet(latents.to(unet.device), PROBE_TIMESTEP, encoder_hidden_states=text_states.to(unet.device),
                   added_cond_kwargs=added_cond_kwargs).sample
    return eps.cpu()


def max_abs_diff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


def require_same_weights(expected: dict, loaded: dict, what: str) -> None:
    """Re-keyed weights must come back exactly: any difference means a key went to the wrong place."""
    missing = sorted(set(expected) - set(loaded))
    unexpected = sorted(set(loaded) - set(expected))
    changed = [k for k in expected if k in loaded
               and (tuple(expected[k].shape) != tuple(loaded[k].shape) or max_abs_diff(expected[k], loaded[k]) != 0)]
    if missing or unexpected or changed:
        examples = ", ".join((missing + unexpected + changed)[:3])
        raise RecareError(
            f"export check failed: the {what} did not load back as written ({len(missing)} missing, "
            f"{len(unexpected)} unexpected, {len(changed)} changed, e.g. {examples}); nothing was written",
            hint=CHECK_FAILED_HINT,
        )


def _load_kwargs(dtype_name: str, pipe, safety_checker: bool = False) -> dict:
    kwargs = dict(torch_dtype=_torch_dtype(dtype_name), local_files_only=True)
    if safety_checker or is_sdxl(pipe):  # SDXL pipelines have no safety checker to turn off
        return kwargs
    return dict(kwargs, safety_checker=None, requires_safety_checker=False)


def _components(pipe) -> tuple[str, ...]:
    """The weight-holding components an export writes and checks."""
    return ("vae", "text_encoder", "text_encoder_2", "unet") if is_sdxl(pipe) else ("vae", "text_encoder", "unet")
