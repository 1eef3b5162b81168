"""Erased UNet weights (`--unet`): finding them, reading them safely, loading them into a pipeline."""

from __future__ import annotations

from pathlib import Path

from recare_cli import cache
from recare_cli.errors import RecareError, UsageError
from recare_cli.models.files import check_safetensors, load_tensor_file, non_finite

TOKENS_FILE = "tokens.safetensors"  # an erase run's learned tokens, next to its unet.safetensors
UNET_FILE = "unet.safetensors"  # what `recare erase` writes into its run directory
_WRAPPER_KEYS = ("state_dict", "unet", "model")
_KEY_PREFIXES = ("module.", "unet.")
UNET_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")


def resolve_unet(spec: str, cache_dir: Path | None = None) -> Path:
    """A path to UNet weights: an existing file or folder, or the name of an erased model in the cache.

    Cheap checks only (the path, its suffix, a safetensors header), so a bad --unet fails before any model loads.
    """
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_dir():
            if (path / UNET_FILE).is_file():
                return path / UNET_FILE  # a run directory
            if not (path / "config.json").is_file():
                raise UsageError(f"--unet '{spec}' is a folder without {UNET_FILE} or a UNet config.json",
                                 hint="pass a run directory, a UNet folder, or a .safetensors/.pt file")
            return path
        if path.suffix.lower() not in UNET_SUFFIXES:
            raise UsageError(f"--unet '{spec}' is not a weights file (expected {', '.join(UNET_SUFFIXES)})",
                             hint="pass a run directory, a UNet folder, or a .safetensors/.pt file")
        if path.suffix.lower() == ".safetensors":
            check_safetensors(path, spec, whole_model=False)
        return path
    run_dir = cache.lookup_erased(cache.cache_root(cache_dir), spec)
    if run_dir is not None and (run_dir / UNET_FILE).is_file():
        return run_dir / UNET_FILE
    raise UsageError(
        f"--unet '{spec}': no such file or folder, and no erased model of that name in the cache",
        hint="see `recare cache` for registered names",
    )


def read_unet_state_dict(path: Path) -> dict:
    import torch

    path = Path(path)
    try:
        if path.is_dir():
            from diffusers import UNet2DConditionModel

            return UNet2DConditionModel.from_pretrained(path).state_dict()
        state = load_tensor_file(path, f"'{path}'")
    except RecareError:
        raise
    except Exception as exc:  # noqa: BLE001 - unreadable weights are a user error, whatever the reason
        raise RecareError(f"cannot read UNet weights from '{path}': {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    while isinstance(state, dict) and len(state) == 1 and next(iter(state)) in _WRAPPER_KEYS:
        state = next(iter(state.values()))
    for key in _WRAPPER_KEYS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise RecareError(f"'{path}' does not hold a UNet state dict (name → tensor)")
    for prefix in _KEY_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    bad = non_finite(state)
    if bad:
        raise RecareError(
            f"the UNet weights in '{path}' are not finite: {len(bad)} of {len(state)} tensors hold NaN or inf "
            f"(e.g. {bad[0]})",
            hint="they come from a training run that diverged; erase again with a lower learning rate",
        )
    return state


def apply_unet_weights(unet, state: dict, source: str, argument: str = "--unet") -> None:
    """Load `state` into `unet`, or fail naming a few mismatched keys (`argument` names where `source` came from)."""
    expected = unet.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items() if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong_shape)):
        if items:
            problems.append(f"{len(items)} {label} (e.g. {', '.join(items[:3])})")
    if problems:
        raise RecareError(
            f"{argument} '{source}' does not fit this model's UNet: {'; '.join(problems)}",
            hint="was it trained from a different base model? pass that one with --model",
        )
    unet.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()})


def load_unet_into(pipe, spec: str, path: Path, state: dict) -> None:
    """Load erased UNet weights (`state`, read from `path`); from an erase run, also its learned tokens."""
    apply_unet_weights(pipe.unet, state, spec)
    from recare_cli.learned_tokens import add_learned_tokens

    tokens = path.parent / TOKENS_FILE
    if path.name == UNET_FILE and tokens.is_file():
        add_learned_tokens(pipe, tokens)
