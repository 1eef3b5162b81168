"""Reading weight files without running code: a safetensors header, a .ckpt of tensors only."""

from __future__ import annotations

from pathlib import Path

from recare_cli.errors import RecareError

SINGLE_FILE_UNET_PREFIX = "model.diffusion_model."  # the UNet's keys in every SD single-file checkpoint


def check_safetensors(path: Path, spec: str, whole_model: bool = True) -> None:
    """Reading the header is cheap; without it a corrupt file fails later as "config not available".

    `whole_model`: a --model single file, which must hold the LDM UNet keys (UNet weights for --unet need not).
    """
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = list(handle.keys())
        if not keys:
            raise RecareError(f"'{spec}' is an empty safetensors file, not a model")
        if whole_model and not any(key.startswith(SINGLE_FILE_UNET_PREFIX) for key in keys):
            raise RecareError(f"'{spec}' is not a Stable Diffusion checkpoint (no {SINGLE_FILE_UNET_PREFIX}* weights)",
                              hint="erased UNet weights go to --unet; --model takes a whole pipeline")
    except RecareError:
        raise
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for bad headers
        raise RecareError(
            f"'{spec}' is not a readable safetensors checkpoint: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
        ) from None


def check_ckpt(path: Path, spec: str) -> None:
    """A .ckpt must hold tensors only; anything else is a bad file (exit 1), not a missing model.

    Loaded with weights_only=True (no code runs, whatever the file's pickle says) and memory-mapped,
    so a multi-GB checkpoint costs little here. torch's own message is not shown: it suggests
    loading with code execution, the unsafe way round.
    """
    try:
        state = torch_load_tensors(path, f"'{spec}'", mmap=True)
    except Exception as exc:  # noqa: BLE001 - a damaged archive, a bare pickle, a refused object: all unreadable
        raise RecareError(f"'{spec}' is unreadable: not a PyTorch checkpoint of tensors ({type(exc).__name__})",
                          hint="the file is damaged, or holds objects other than tensors (refused: loading them "
                               "could run code)") from None
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not any(str(key).startswith(SINGLE_FILE_UNET_PREFIX) for key in state):
        raise RecareError(f"'{spec}' is not a Stable Diffusion checkpoint (no {SINGLE_FILE_UNET_PREFIX}* weights)",
                          hint="erased UNet weights go to --unet; --model takes a whole pipeline")


def torch_load_tensors(path: Path, described: str, map_location: str = "cpu", mmap: bool = False):
    """torch.load restricted to tensors and plain containers: recare never unpickles code.

    torch's own message for a refused pickle suggests the unsafe fix (loading with code execution): never shown.
    """
    import pickle
    import warnings

    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on pickle protocols: the user cannot act on them
            return torch.load(str(path), map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        if "weights only load failed" not in str(exc).lower():
            raise  # not a pickle at all: the caller says the file is unreadable
        raise RecareError(
            f"{described} is not a plain tensor file: it holds pickled Python objects, and recare never unpickles code",
            hint="save the weights as a state dict of tensors, or as .safetensors",
        ) from None


def non_finite(tensors: dict) -> list[str]:
    """Names of the floating-point tensors holding NaN or ±inf."""
    import torch

    return [name for name, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def load_tensor_file(path: Path, described: str):
    """A .safetensors file's tensors, or what a torch file holds if it is only tensors and plain containers."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch_load_tensors(path, described)
