"""CLIP through open_clip: one loader for the CARE set, CARE score, CLIP score and zero-shot labels.

`--clip-model` is an open_clip model name (`ViT-B-32`), an open_clip folder (open_clip_config.json
plus weights), `hf-hub:org/repo`, or a built-in: `toy` (trained on the toy world, shipped in the
package) or `tiny-random` (random weights). `--clip-pretrained` is an open_clip tag (`openai`) or a
local checkpoint file. A built-in is written once into recare's cache as an open_clip folder and
then loaded like any user folder, so tests exercise the real loading path.

The vocabulary embeddings (recare-method.md §6.1) are computed once per model and vocabulary and
kept under `<cache>/clip/<model slug>/` as float16 safetensors.

Nothing heavy is imported at module level.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from recare_cli import cache
from recare_cli.errors import ModelNotAvailable, RecareError, UsageError
from recare_cli.output import QUIET_REPORTER, Reporter

DEFAULT_CLIP_MODEL = "ViT-B-32"
DEFAULT_CLIP_PRETRAINED = "openai"
TINY_RANDOM = "tiny-random"
TOY = "toy"
OPEN_CLIP_CONFIG = "open_clip_config.json"
BUILTIN_WEIGHTS = "open_clip_model.safetensors"
LOCAL_DIR = "local-dir:"
HF_HUB = "hf-hub:"
SUPPLY_HINT = "supply the weights with --clip-pretrained /path/to/open_clip_pytorch_model.bin"

# Small enough that the whole 49,408-token vocabulary encodes in seconds on a CPU; the text side
# keeps CLIP's real vocabulary and context so tokenisation is exactly the real model's.
TINY_RANDOM_CONFIG = {
    "seed": 0,
    "model_cfg": {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
    },
    "preprocess_cfg": {"size": 32, "mean": [0.48145466, 0.4578275, 0.40821073],
                       "std": [0.26862954, 0.26130258, 0.27577711],
                       "interpolation": "bicubic", "resize_mode": "shortest"},
}


@dataclass
class ClipModel:
    """A loaded CLIP with the model's own tokenizer and image preprocessing."""

    model: Any
    tokenizer: Any
    preprocess: Any
    key: str  # identifies model + weights; used in cache keys
    name: str
    pretrained: str | None
    device: str = "cpu"

    @property
    def logit_scale(self) -> float:
        """The learned temperature, exponentiated: logits = logit_scale * image @ text.T."""
        return float(self.model.logit_scale.detach().exp().item())

    def encode_text(self, texts: Sequence[str], batch_size: int = 256, task=None) -> "torch.Tensor":
        """L2-normalised float32 text embeddings [n, d] on the CPU; `task` is advanced per text."""
        import torch

        chunks = []
        with torch.no_grad():
            for start in range(0, len(texts), batch_size * 8):
                part = list(texts[start:start + batch_size * 8])
                tokens = self.tokenizer(part)
                # Batching texts of similar length keeps the cut after end-of-text short (_encode_tokens).
                order = torch.argsort(tokens.argmax(dim=-1), stable=True)
                sorted_features = []
                for b in range(0, len(part), batch_size):
                    batch_tokens = tokens[order[b:b + batch_size]].to(self.device)
                    features = self._encode_tokens(batch_tokens).float()
                    sorted_features.append(torch.nn.functional.normalize(features, dim=-1).cpu())
                    if task is not None:
                        task.advance(len(batch_tokens))
                chunks.append(torch.cat(sorted_features)[torch.argsort(order)])
        return torch.cat(chunks) if chunks else torch.empty(0, 0)

    def _encode_tokens(self, tokens: "torch.Tensor") -> "torch.Tensor":
        """The text tower on the tokens up to the last end-of-text only.

        With a causal mask and pooling at the end-of-text token (CLIP's argmax), no position after
        it can change the output, so cutting the padding is exact; vocabulary tokens are 3-10 tokens
        long out of 77, which makes the 49,408-token vocabulary several times cheaper to encode.
        """
        import torch

        model = self.model
        if not _causal_argmax_text(model):
            return model.encode_text(tokens)
        eot_positions = tokens.argmax(dim=-1)
        length = int(eot_positions.max()) + 1
        cast_dtype = model.transformer.get_cast_dtype()
        x = model.token_embedding(tokens[:, :length]).to(cast_dtype)
        x = x + model.positional_embedding[:length].to(cast_dtype)
        x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
        x = model.ln_final(x)
        pooled = x[torch.arange(x.shape[0], device=x.device), eot_positions]
        if isinstance(model.text_projection, torch.nn.Linear):
            return model.text_projection(pooled)
        return pooled @ model.text_projection

    def encode_images(self, images: Sequence, batch_size: int = 32) -> "torch.Tensor":
        """L2-normalised float32 image embeddings [n, d] on the CPU, PIL images in."""
        import torch

        chunks = []
        with torch.no_grad():
            for start in range(0, len(images), batch_size):
                pixels = torch.stack([self.preprocess(image.convert("RGB"))
                                      for image in images[start:start + batch_size]])
                features = self.model.encode_image(pixels.to(self.device)).float()
                chunks.append(torch.nn.functional.normalize(features, dim=-1).cpu())
        return torch.cat(chunks) if chunks else torch.empty(0, 0)


def _causal_argmax_text(model) -> bool:
    """Whether `model` is open_clip's built-in text tower with a causal mask and argmax pooling."""
    import open_clip
    import torch

    mask = getattr(model, "attn_mask", None)
    if not isinstance(model, open_clip.CLIP) or getattr(model, "text_pool_type", None) != "argmax" or mask is None:
        return False
    return bool(torch.equal(torch.isinf(mask), torch.ones_like(mask, dtype=torch.bool).triu(1)))


# loading ------------------------------------------------------------------------------------------

def default_clip_model(base_model: str) -> str:
    """The CLIP to use with a base model: a built-in model comes with its built-in CLIP (tiny-random, toy)."""
    return BUILTIN_MODEL_CLIPS.get(base_model, DEFAULT_CLIP_MODEL)


def load_clip(name: str = DEFAULT_CLIP_MODEL, pretrained: str | None = DEFAULT_CLIP_PRETRAINED,
              cache_dir=None, offline: bool = False, device: str = "cpu") -> ClipModel:
    """Load a CLIP model (see the module docstring for what `name` and `pretrained` accept)."""
    from recare_cli.models import is_offline, resolve_device

    if not name or not name.strip():
        raise UsageError("--clip-model is empty", hint=f"e.g. {DEFAULT_CLIP_MODEL} or {TINY_RANDOM}")
    device = resolve_device(device)
    offline = is_offline(offline)
    if name in BUILTIN_CLIPS:
        folder, digest = builtin_clip_path(name, cache_dir)
        return _load_folder(folder, f"{name}:{digest}", name, None, device)
    if name.startswith(LOCAL_DIR) or Path(name).expanduser().is_dir():
        folder = Path(name[len(LOCAL_DIR):] if name.startswith(LOCAL_DIR) else name).expanduser()
        return _load_folder(folder, f"local-dir:{_file_identity(folder)}", name, None, device)
    if name.startswith(HF_HUB):
        return _load_hf_hub(name, offline, device)
    return _load_named(name, pretrained, offline, device)


def _load_folder(folder: Path, key: str, name: str, pretrained: str | None, device: str) -> ClipModel:
    if not (folder / OPEN_CLIP_CONFIG).is_file():
        raise RecareError(
            f"CLIP folder '{folder}' has no {OPEN_CLIP_CONFIG}",
            hint="an open_clip folder holds open_clip_config.json and its weights",
        )
    spec = f"{LOCAL_DIR}{folder}"
    return _create(spec, None, key, name, pretrained, device, preprocess_overlay={})


def _load_hf_hub(name: str, offline: bool, device: str) -> ClipModel:
    if offline:
        from huggingface_hub import try_to_load_from_cache

        repo = name[len(HF_HUB):]
        if not isinstance(try_to_load_from_cache(repo, OPEN_CLIP_CONFIG), str):
            raise ModelNotAvailable(
                f"CLIP '{name}' is not in the local Hugging Face cache and recare is offline",
                hint="download it once online, or pass a local open_clip folder with --clip-model",
            )
    return _create(name, None, name, name, None, device, preprocess_overlay={})


def _load_named(name: str, pretrained: str | None, offline: bool, device: str) -> ClipModel:
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
        return _create(name, str(checkpoint), f"{name}:file:{_file_identity(checkpoint)}", name, pretrained,
                       device, preprocess_overlay={})
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
    return _create(name, weights, f"{name}:{pretrained}", name, pretrained, device,
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
        with _quiet_open_clip():
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


def _create(spec: str, checkpoint: str | None, key: str, name: str, pretrained: str | None, device: str,
            preprocess_overlay: dict, quick_gelu: bool = False) -> ClipModel:
    import open_clip
    from open_clip.transform import merge_preprocess_dict

    overlay = merge_preprocess_dict({}, preprocess_overlay)
    try:
        with _quiet_open_clip():
            model, _, preprocess = open_clip.create_model_and_transforms(
                spec, pretrained=checkpoint, device=device, force_quick_gelu=quick_gelu,
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
            f"could not load CLIP weights '{where}' into {name}: {type(exc).__name__}: {first_line[:200]}",
            hint="does the checkpoint match --clip-model?",
        ) from None
    model.eval()
    return ClipModel(model, tokenizer, preprocess, key, name, pretrained, device)


@contextmanager
def _quiet_open_clip() -> Iterator[None]:
    """open_clip logs through the root logger and warns freely; recare owns the terminal."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


def _file_identity(path: Path) -> str:
    """Path, size and mtime: enough to notice replaced weights without hashing gigabytes."""
    path = path.resolve()
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    stamp = ";".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)
    return f"{path}:{hashlib.sha256(stamp.encode()).hexdigest()[:12]}"


# built-in CLIPs ------------------------------------------------------------------------------

def _tiny_random_files() -> tuple[dict, dict]:
    """The random-weight CLIP's open_clip config and state dict."""
    import open_clip
    import torch

    clip_config = {"model_cfg": TINY_RANDOM_CONFIG["model_cfg"], "preprocess_cfg": TINY_RANDOM_CONFIG["preprocess_cfg"]}
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / OPEN_CLIP_CONFIG).write_text(json.dumps(clip_config))
        torch.manual_seed(TINY_RANDOM_CONFIG["seed"])
        with _quiet_open_clip():
            model = open_clip.create_model(f"{LOCAL_DIR}{folder}", pretrained=None)
    return clip_config, model.state_dict()


def _toy_files() -> tuple[dict, dict]:
    from recare_cli.toy.package import clip_files

    return clip_files()


def _tiny_random_digest() -> str:
    return hashlib.sha256(json.dumps(TINY_RANDOM_CONFIG, sort_keys=True).encode()).hexdigest()[:16]


def _toy_digest() -> str:
    from recare_cli.models import TOY_FILES, builtin_digest

    return builtin_digest(TOY_FILES)


# name -> (config and weights, digest of what they are made from)
BUILTIN_CLIPS = {TINY_RANDOM: (_tiny_random_files, _tiny_random_digest), TOY: (_toy_files, _toy_digest)}
# Built-in base model -> its CLIP: the random-weight models, whatever their family, share tiny-random's.
BUILTIN_MODEL_CLIPS = {TINY_RANDOM: TINY_RANDOM, "tiny-random-v": TINY_RANDOM, "tiny-random-xl": TINY_RANDOM, TOY: TOY}


def builtin_clip_path(name: str, cache_dir=None) -> tuple[Path, str]:
    """A built-in CLIP's open_clip folder in recare's cache (built on first use), and its digest."""
    from safetensors.torch import save_file

    from recare_cli.fsutil import write_json

    files, digest_of = BUILTIN_CLIPS[name]
    digest = digest_of()

    def build(folder: Path) -> None:
        clip_config, state = files()
        write_json(folder / OPEN_CLIP_CONFIG, clip_config)
        save_file({k: v.detach().contiguous() for k, v in state.items()}, str(folder / BUILTIN_WEIGHTS))

    return cache.built_entry(cache.cache_root(cache_dir), "clip", name, digest, build), digest


# vocabulary embeddings ------------------------------------------------------------------------

def _stored_embeddings(path: Path, n_tokens: int):
    """The cached embeddings at `path` when whole (a readable file of the right shape), else None."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        return None
    try:
        stored = load_file(str(path))["embeddings"]
    except (SafetensorError, OSError, KeyError):
        return None  # a damaged cache entry is rebuilt
    return stored if stored.shape[0] == n_tokens else None


def cache_slug(key: str) -> str:
    """A folder name for a model key: readable prefix + hash (keys hold paths and colons)."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "-", key.split(":file:")[0].split(":/")[0]).strip("-")[:48]
    return f"{readable}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


def vocab_embeddings(clip: ClipModel, tokens: Sequence[str] | None = None, cache_dir=None,
                     reporter: Reporter = QUIET_REPORTER, batch_size: int = 512) -> "torch.Tensor":
    """float16 [len(tokens), d] embeddings of the vocabulary (default: CLIP's 49,408 BPE tokens).

    Cached per model and vocabulary under <cache>/clip/<model slug>/vocab-<digest>.safetensors.
    """
    import torch

    from recare_cli.clipvocab import vocab
    from recare_cli.fsutil import write_safetensors

    tokens = tuple(tokens if tokens is not None else vocab())
    vocab_digest = hashlib.sha256("\n".join(tokens).encode()).hexdigest()[:16]
    root = cache.cache_root(cache_dir)
    path = root / "clip" / cache_slug(clip.key) / f"vocab-{vocab_digest}.safetensors"
    stored = _stored_embeddings(path, len(tokens))
    if stored is not None:
        return stored
    with cache.locked(root, "clip", f"{path.parent.name}-{path.stem}"):
        stored = _stored_embeddings(path, len(tokens))  # written by another process while this one waited
        if stored is not None:
            return stored
        with reporter.progress("CLIP vocabulary", total=len(tokens)) as task:
            embeddings = clip.encode_text(tokens, batch_size=batch_size, task=task).to(torch.float16)
        write_safetensors(path, {"embeddings": embeddings}, {"clip_key": clip.key, "n_tokens": str(len(tokens))})
    return embeddings
