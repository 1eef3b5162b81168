"""Format `lora`: the weight difference as a PEFT LoRA of the base, by truncated SVD."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

from recare_cli.errors import RecareError
from recare_cli.export.check import CHECK_FAILED_HINT, TOLERANCE, max_abs_diff, unet_probe
from recare_cli.export.settings import ExportResult
from recare_cli.export.writing import _cast, _erased_pipeline, _metadata
from recare_cli.output import QUIET_REPORTER, Reporter


@dataclass
class LoraFactors:
    tensors: dict  # diffusers/PEFT keys: unet.<module>.lora_A.weight / lora_B.weight / lora_B.bias
    reconstructed: dict  # base + B @ A (+ bias delta) per changed weight: what the file encodes
    relative_error: float  # ||dW - B A||_F / ||dW||_F over every changed weight
    layers: int
    rank: int  # the largest rank of any layer: the one asked for, or less where no layer is that wide
    not_representable: list[str]  # changed weights outside Linear/Conv2d layers (norms, embeddings)


def lora_factors(unet, base_state: dict, erased_state: dict, rank: int,
                 reporter: Reporter = QUIET_REPORTER) -> LoraFactors:
    """Truncated SVD of W_erased - W_base for every changed Linear / Conv2d (a conv as [out, in*kh*kw]).

    sqrt(S) goes to both factors so neither holds the whole dynamic range (it matters in fp16).
    Bias differences are exact, as PEFT's lora_B bias.
    """
    import torch

    layers = [name for name, module in unet.named_modules()
              if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))
              and getattr(module, "groups", 1) == 1
              and _changed(base_state, erased_state, f"{name}.weight", f"{name}.bias")]
    covered = {f"{name}.{p}" for name in layers for p in ("weight", "bias")}
    not_representable = sorted(k for k in base_state if k not in covered and _changed(base_state, erased_state, k))
    if not layers:
        raise RecareError(
            "the source UNet has the base model's Linear/Conv2d weights: there is no difference to export as a LoRA",
            hint="is --model the erased model instead of its base?",
        )
    any_bias_delta = any(_changed(base_state, erased_state, f"{name}.bias") for name in layers)
    tensors, reconstructed = {}, {}
    residual_energy = total_energy = 0.0
    largest_rank = 0
    with reporter.progress("LoRA factors (SVD)", total=len(layers)) as task:
        for name in layers:
            weight_key = f"{name}.weight"
            base_weight = base_state[weight_key].float()
            delta_weight = erased_state[weight_key].float().to(base_weight.device) - base_weight
            delta_matrix = delta_weight.reshape(delta_weight.shape[0], -1)
            u, s, vh = torch.linalg.svd(delta_matrix, full_matrices=False)
            r = min(rank, s.numel())
            largest_rank = max(largest_rank, r)
            sqrt_s = s[:r].sqrt()
            lora_b = u[:, :r] * sqrt_s  # [out, r]
            lora_a = sqrt_s[:, None] * vh[:r]  # [r, in * kh * kw]
            residual_energy += s[r:].square().sum().item()
            total_energy += s.square().sum().item()
            reconstructed[weight_key] = base_weight + (lora_b @ lora_a).reshape(delta_weight.shape)
            if delta_weight.ndim == 4:  # PEFT's conv LoRA: A is a kh x kw conv to r channels, B a 1x1 conv
                lora_a = lora_a.reshape(r, *delta_weight.shape[1:])
                lora_b = lora_b[:, :, None, None]
            tensors[f"unet.{name}.lora_A.weight"] = lora_a
            tensors[f"unet.{name}.lora_B.weight"] = lora_b
            if any_bias_delta:
                # PEFT gives every adapted layer a lora_B bias once one has it: write zeros where none changed.
                bias_key = f"{name}.bias"
                if bias_key in base_state:
                    delta_bias = erased_state[bias_key].float().to(base_weight.device) - base_state[bias_key].float()
                else:
                    delta_bias = torch.zeros(delta_weight.shape[0], device=base_weight.device)
                tensors[f"unet.{name}.lora_B.bias"] = delta_bias
                if bias_key in base_state:
                    reconstructed[bias_key] = base_state[bias_key].float() + delta_bias
            task.advance(1, layer=name.split(".")[0])
    relative_error = (residual_energy / total_energy) ** 0.5 if total_energy > 0 else 0.0
    return LoraFactors(tensors, reconstructed, relative_error, len(layers), largest_rank, not_representable)


def _changed(base_state: dict, erased_state: dict, *keys: str) -> bool:
    return any(k in base_state and not base_state[k].equal(erased_state[k].to(base_state[k].device)) for k in keys)


def _export_lora(pipe, ref, source, settings, staged: Path, reporter) -> ExportResult:
    from peft.tuners.tuners_utils import BaseTunerLayer
    from safetensors.torch import save_file

    base_state = {k: v.detach().clone() for k, v in pipe.unet.state_dict().items()}
    erased_state = _erased_pipeline(pipe, source)
    reference = unet_probe(pipe.unet)
    factors = lora_factors(pipe.unet, base_state, erased_state, settings.rank, reporter)
    if factors.not_representable:
        reporter.warn(f"{len(factors.not_representable)} changed weights are not in Linear/Conv2d layers and are "
                      f"left out of the LoRA (e.g. {', '.join(factors.not_representable[:3])})")
    save_file(_cast(factors.tensors, settings.dtype), str(staged),
              metadata=_metadata(source, ref, settings, rank=factors.rank,
                                 relative_error=f"{factors.relative_error:.6g}"))

    pipe.unet.load_state_dict({**base_state, **factors.reconstructed})
    reconstructed_probe = unet_probe(pipe.unet)
    pipe.unet.load_state_dict(base_state)
    try:
        with warnings.catch_warnings():
            # PEFT warns that a bias-free layer with a lora_B bias cannot be merged; loading is unaffected.
            warnings.filterwarnings("ignore", message=".*lora_bias=True.*")
            pipe.load_lora_weights(str(staged), adapter_name="recare")
    except (ValueError, KeyError, RuntimeError) as exc:
        raise RecareError(f"export check failed: diffusers could not load the LoRA back: "
                          f"{str(exc).splitlines()[0]}; nothing was written", hint=CHECK_FAILED_HINT) from exc
    adapted = sum(isinstance(m, BaseTunerLayer) for m in pipe.unet.modules())
    if adapted != factors.layers:
        raise RecareError(f"export check failed: diffusers adapted {adapted} UNet layers, the LoRA has "
                          f"{factors.layers}; nothing was written", hint=CHECK_FAILED_HINT)
    lora_probe = unet_probe(pipe.unet)
    diff = max_abs_diff(lora_probe, reconstructed_probe)
    return ExportResult(
        "lora", "", ref.spec, settings.dtype, diff, TOLERANCE[settings.dtype],
        f"the base plus the rank-{factors.rank} difference",
        details={"rank": factors.rank, "rank_asked": settings.rank, "layers": factors.layers,
                 "relative_error": factors.relative_error,
                 "max_abs_diff_vs_source": max_abs_diff(lora_probe, reference),
                 "not_representable": len(factors.not_representable)},
    )
