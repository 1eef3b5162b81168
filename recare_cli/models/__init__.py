"""Resolving `--model` / `--unet` and loading pipelines: the one package every command uses.

Nothing heavy is imported at module level: the CLI imports this module at start-up.

`--model` is a Hugging Face repo id (through the standard HF cache), a local diffusers folder, a
single-file checkpoint, or a built-in name (`tiny-random`). Built-ins are written once into
recare's cache and then loaded exactly like a diffusers folder.

The package's parts: `resolve` (what --model names), `builtin` (the built-in models), `files`
(weight files read without running code), `unet` (--unet weights), `runtime` (devices, dtypes,
schedulers, pipeline loading and `Runtime`).
"""

from recare_cli.models.builtin import BUILTIN_MODELS, TOY_FILES, builtin_digest, builtin_path
from recare_cli.models.files import non_finite, torch_load_tensors
from recare_cli.models.resolve import DEFAULT_MODEL, ModelRef, is_offline, resolve_model
from recare_cli.models.runtime import (
    Runtime, check_scheduler, is_sdxl, library_versions, load_pipeline, pipeline_class_name, resolve_device,
    resolve_dtype, set_scheduler,
)
from recare_cli.models.unet import TOKENS_FILE, UNET_FILE, apply_unet_weights, read_unet_state_dict, resolve_unet

__all__ = [
    "BUILTIN_MODELS", "DEFAULT_MODEL", "TOKENS_FILE", "TOY_FILES", "UNET_FILE", "ModelRef", "Runtime",
    "apply_unet_weights", "builtin_digest", "builtin_path", "check_scheduler", "is_offline", "is_sdxl",
    "library_versions", "load_pipeline", "non_finite", "pipeline_class_name", "read_unet_state_dict",
    "resolve_device", "resolve_dtype", "resolve_model", "resolve_unet", "set_scheduler", "torch_load_tensors",
]
