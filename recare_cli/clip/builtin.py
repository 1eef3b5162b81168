"""The built-in CLIPs: `tiny-random` (random weights) and `toy` (trained on the toy world), each written
once into recare's cache as an open_clip folder and then loaded like any user folder."""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

from recare_cli import cache
from recare_cli.clip.model import LOCAL_DIR, OPEN_CLIP_CONFIG, quiet_open_clip

TINY_RANDOM = "tiny-random"
TOY = "toy"
BUILTIN_WEIGHTS = "open_clip_model.safetensors"

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


def _tiny_random_files() -> tuple[dict, dict]:
    """The random-weight CLIP's open_clip config and state dict."""
    import open_clip
    import torch

    clip_config = {"model_cfg": TINY_RANDOM_CONFIG["model_cfg"], "preprocess_cfg": TINY_RANDOM_CONFIG["preprocess_cfg"]}
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / OPEN_CLIP_CONFIG).write_text(json.dumps(clip_config))
        torch.manual_seed(TINY_RANDOM_CONFIG["seed"])
        with quiet_open_clip():
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
