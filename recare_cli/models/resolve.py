"""What `--model` names: a built-in, a diffusers folder, a single-file checkpoint or a hub id (through
the standard Hugging Face cache)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from recare_cli.errors import ModelNotAvailable, RecareError
from recare_cli.models.builtin import BUILTIN_MODELS, builtin_path
from recare_cli.models.files import check_ckpt, check_safetensors

DEFAULT_MODEL = "CompVis/stable-diffusion-v1-4"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
# What a pipeline needs from a hub repo; SD repos also hold multi-GB .ckpt files we never want.
HUB_PATTERNS = ["model_index.json", "*/*.json", "*/*.txt", "*/*.safetensors"]


@dataclass(frozen=True)
class ModelRef:
    spec: str  # what the user typed
    kind: str  # builtin | hub | folder | single-file
    path: Path
    revision: str | None = None

    def describe(self) -> dict:
        return {"model": self.spec, "kind": self.kind, "path": str(self.path), "revision": self.revision}


def hub_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return Path(home) / "hub"


def is_offline(offline: bool) -> bool:
    return offline or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def resolve_model(spec: str, cache_dir: Path | None = None, offline: bool = False) -> ModelRef:
    if spec in BUILTIN_MODELS:
        return ModelRef(spec, "builtin", builtin_path(spec, cache_dir))
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise RecareError(
                f"'{spec}' is not a diffusers pipeline folder (no model_index.json)",
                hint="pass a folder saved with save_pretrained, a .safetensors/.ckpt file, a hub id or a built-in name",
            )
        return ModelRef(spec, "folder", path)
    if path.is_file():
        if path.suffix not in SINGLE_FILE_SUFFIXES:
            raise RecareError(
                f"'{spec}' is not a model: a single-file checkpoint must end in .safetensors or .ckpt",
            )
        if path.suffix == ".safetensors":
            check_safetensors(path, spec)
        else:
            check_ckpt(path, spec)
        return ModelRef(spec, "single-file", path)
    if HUB_ID.match(spec) and not spec.startswith((".", "/", "~")):
        return _resolve_hub(spec, offline)
    builtins = ", ".join(BUILTIN_MODELS)
    raise ModelNotAvailable(
        f"model '{spec}' not found: no such folder or file, and not a hub id or built-in",
        hint=f"built-ins: {builtins}",
    )


def _resolve_hub(repo_id: str, offline: bool) -> ModelRef:
    from huggingface_hub import snapshot_download

    hub_cache = hub_cache_dir()
    try:
        folder = snapshot_download(repo_id, cache_dir=hub_cache, local_files_only=True)
    except Exception:  # noqa: BLE001 - any failure here just means "not cached"
        if is_offline(offline):
            raise ModelNotAvailable(
                f"model '{repo_id}' is not in the local Hugging Face cache ({hub_cache}) and offline mode is on",
                hint=f"download it once online (`hf download {repo_id}`) or pass a local folder",
            ) from None
        try:
            folder = snapshot_download(repo_id, cache_dir=hub_cache, allow_patterns=HUB_PATTERNS)
        except Exception as exc:  # noqa: BLE001 - network, auth, missing repo: all mean unavailable
            raise ModelNotAvailable(
                f"model '{repo_id}' could not be downloaded: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                hint="check the id and your network, or pass a local folder with --model",
            ) from None
    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        raise RecareError(f"hub model '{repo_id}' in {folder} is not a diffusers pipeline (no model_index.json)")
    return ModelRef(repo_id, "hub", folder, revision=folder.name)
