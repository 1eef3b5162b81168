"""The vocabulary's CLIP text embeddings (recare-method.md §6.1), computed once per model and
vocabulary and kept under `<cache>/clip/<model slug>/` as float16 safetensors."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    import torch

from recare_cli import cache
from recare_cli.clip.model import ClipModel
from recare_cli.output import QUIET_REPORTER, Reporter


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
