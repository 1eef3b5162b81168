"""Loading a CLIP by name: a built-in, an open_clip folder, `hf-hub:org/repo`, or an open_clip model
name with a pretrained tag or a local checkpoint (see recare_cli/clip/__init__.py)."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from recare_cli.clip.builtin import BUILTIN_CLIPS, BUILTIN_MODEL_CLIPS, TINY_RANDOM, TOY, builtin_clip_path
from recare_cli.clip.model import LOCAL_DIR, OPEN_CLIP_CONFIG, ClipModel, quiet_open_clip
from recare_cli.errors import ModelNotAvailable, RecareError, UsageError

DEFAULT_CLIP_MODEL = "ViT-B-32"
DEFAULT_CLIP_PRETRAINED = "openai"
HF_HUB = "hf-hub:"
SUPPLY_HINT = "supply the weights with --clip-pretrained /path/to/open_clip_pytorch_model.bin"


def default_clip_model(base_model: str) -> str:
    """The CLIP to use with a base model: a built-in model comes with its built-in CLIP (tiny-random, toy)."""
    return BUILTIN_MODEL_CLIPS.get(base_model, DEFAULT_CLIP_MODEL)


@dataclass(frozen=True)
class ClipSource:
    """Where a CLIP comes from, checked and on disk (or for open_clip to fetch): `_create`'s arguments."""

    spec: str
    checkpoint: str | None
    key: str
    name: str
    pretrained: str | None
    preprocess_overlay: dict = field(default_factory=dict)
    quick_gelu: bool = False


def load_clip(name: str = DEFAULT_CLIP_MODEL, pretrained: str | None = DEFAULT_CLIP_PRETRAINED,
              cache_dir=None, offline: bool = False, device: str = "cpu") -> ClipModel:
    """Load a CLIP model (see the module docstring for what `name` and `pretrained` accept)."""
    from recare_cli.models import resolve_device

    source = locate_clip(name, pretrained, cache_dir, offline)
    return _create(source, resolve_device(device))


def locate_clip(name: str = DEFAULT_CLIP_MODEL, pretrained: str | None = DEFAULT_CLIP_PRETRAINED,
                cache_dir=None, offline: bool = False) -> ClipSource:
    """Every refusal `load_clip` can give short of building the model, and the weights fetched.

    A command that loads its CLIP only after long work (erase renders the training images first)
    calls this before starting, so a mistyped --clip-model costs nothing.
    """
    from recare_cli.models import is_offline

    if not name or not name.strip():
        raise UsageError("--clip-model is empty", hint=f"e.g. {DEFAULT_CLIP_MODEL} or {TINY_RANDOM}")
    offline = is_offline(offline)
    if name in BUILTIN_CLIPS:
        folder, digest = builtin_clip_path(name, cache_dir)
        return _folder_source(folder, f"{name}:{digest}", name)
    if name.startswith(LOCAL_DIR) or Path(name).expanduser().is_dir():
        folder = Path(name[len(LOCAL_DIR):] if name.startswith(LOCAL_DIR) else name).expanduser()
        return _folder_source(folder, f"local-dir:{_file_identity(folder)}", name)
    if name.startswith(HF_HUB):
        return _hf_hub_source(name, offline)
    return _named_source(name, pretrained, offline)


def _folder_source(folder: Path, key: str, name: str) -> ClipSource:
    if not (folder / OPEN_CLIP_CONFIG).is_file():
        raise RecareError(
            f"CLIP folder '{folder}' has no {OPEN_CLIP_CONFIG}",
            hint="an open_clip folder holds open_clip_config.json and its weights",
        )
    return ClipSource(f"{LOCAL_DIR}{folder}", None, key, name, None)


def _hf_hub_source(name: str, offline: bool) -> ClipSource:
    if offline:
        from huggingface_hub import try_to_load_from_cache

        repo = name[len(HF_HUB):]
        if not isinstance(try_to_load_from_cache(repo, OPEN_CLIP_CONFIG), str):
            raise ModelNotAvailable(
                f"CLIP '{name}' is not in the local Hugging Face cache and recare is offline",
                hint="download it once online, or pass a local open_clip folder with --clip-model",
            )
    return ClipSource(name, None, name, name, None)


def _named_source(name: str, pretrained: str | None, offline: bool) -> ClipSource:
    import open_clip
    from open_clip.pretrained import get_pretrained_cfg, list_pretrained_tags_by_model

    if name not in open_clip.list_models():
        examples = ", ".join(m for m in ("ViT-B-32", "ViT-B-16", "ViT-L-14", "RN50") if m in open_clip.list_models())
        raise UsageError(
            f"--clip-model '{name}' is not an open_clip model, a folder or a built-in ({', '.join(BUILTIN_CLIPS)})",
            hint=f"e.g. {examples}, or {TOY}; open_clip.list_models() lists them all",
        )
    if pretrained is None:
        pretrained = DEFAULT_CLIP_PRETRAINED
    if not pretrained.strip():
        raise UsageError(f"--clip-pretrained is empty for '{name}'", hint=SUPPLY_HINT)
    checkpoint = Path(pretrained).expanduser()
    if checkpoint.is_file():
        return ClipSource(name, str(checkpoint), f"{name}:file:{_file_identity(checkpoint)}", name, pretrained)
    tag_cfg = get_pretrained_cfg(name, pretrained)
    if not tag_cfg:
        tags = ", ".join(list_pretrained_tags_by_model(name)) or "none"
        raise UsageError(
            f"--clip-pretrained '{pretrained}' is neither a file nor a pretrained tag of {name}",
            hint=f"tags of {name}: {tags}",
        )
    weights = _tag_weights(name, pretrained, tag_cfg, offline)
    # The reference builds OpenAI CLIPs with QuickGELU (open_clip < 3 did this for `openai`); open_clip
    # 3 only warns about the mismatch, which would change every embedding.
    return ClipSource(name, weights, f"{name}:{pretrained}", name, pretrained,
                      preprocess_overlay=tag_cfg, quick_gelu=bool(tag_cfg.get("quick_gelu", False)))


def _tag_weights(name: str, tag: str, tag_cfg: dict, offline: bool) -> str:
    """The local file of a pretrained tag: from the caches, or downloaded when online."""
    from open_clip.pretrained import download_pretrained

    cached = _cached_tag_file(tag_cfg)
    if cached is not None:
        return cached
    if offline:
        raise ModelNotAvailable(
            f"CLIP weights {name}/{tag} are not cached and recare is offline",
            hint=f"download them once online, or {SUPPLY_HINT}",
        )
    try:
        with quiet_open_clip():
            return download_pretrained(tag_cfg)
    except Exception as exc:  # noqa: BLE001 - network, hub or disk: all mean "not available"
        raise ModelNotAvailable(
            f"CLIP weights {name}/{tag} could not be downloaded: {type(exc).__name__}",
            hint=SUPPLY_HINT,
        ) from None


def _cached_tag_file(tag_cfg: dict) -> str | None:
    """Where open_clip would have stored the tag's weights, if they are already there."""
    from huggingface_hub import try_to_load_from_cache
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    if tag_cfg.get("hf_hub"):
        repo, filename = os.path.split(tag_cfg["hf_hub"])
        filename = filename or HF_WEIGHTS_NAME
        candidates = [HF_SAFE_WEIGHTS_NAME] if filename == HF_WEIGHTS_NAME else []
        if filename.endswith((".bin", ".pth")) and filename != HF_WEIGHTS_NAME:
            candidates.append(filename[:-4] + ".safetensors")
        for candidate in [*candidates, filename]:
            found = try_to_load_from_cache(repo, candidate)
            if isinstance(found, str):
                return found
    if tag_cfg.get("url"):
        path = Path("~/.cache/clip").expanduser() / os.path.basename(tag_cfg["url"])
        if path.is_file():
            return str(path)
    return None


def _create(source: ClipSource, device: str) -> ClipModel:
    import open_clip
    from open_clip.transform import merge_preprocess_dict

    spec, checkpoint = source.spec, source.checkpoint
    overlay = merge_preprocess_dict({}, source.preprocess_overlay)
    try:
        with quiet_open_clip():
            model, _, preprocess = open_clip.create_model_and_transforms(
                spec, pretrained=checkpoint, device=device, force_quick_gelu=source.quick_gelu,
                image_mean=overlay.get("mean"), image_std=overlay.get("std"),
                image_interpolation=overlay.get("interpolation"), image_resize_mode=overlay.get("resize_mode"),
            )
            tokenizer = open_clip.get_tokenizer(spec)
    except RecareError:
        raise
    except Exception as exc:  # noqa: BLE001 - a wrong or broken checkpoint is a user error
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        where = checkpoint or spec
        if spec.startswith(HF_HUB):
            raise ModelNotAvailable(
                f"could not load CLIP '{spec}': {type(exc).__name__}: {first_line[:200]}",
                hint="check the repo id and your network, or pass a local open_clip folder with --clip-model",
            ) from None
        raise RecareError(
            f"could not load CLIP weights '{where}' into {source.name}: {type(exc).__name__}: {first_line[:200]}",
            hint="does the checkpoint match --clip-model?",
        ) from None
    model.eval()
    return ClipModel(model, tokenizer, preprocess, source.key, source.name, source.pretrained, device)


def _file_identity(path: Path) -> str:
    """Path, size and mtime: enough to notice replaced weights without hashing gigabytes."""
    path = path.resolve()
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    stamp = ";".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)
    return f"{path}:{hashlib.sha256(stamp.encode()).hexdigest()[:12]}"
