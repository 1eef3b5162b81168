"""The shipped toy models (recare_cli/data/toy/): turned into a diffusers folder, an open_clip folder
and a classifier, so that `--model toy` and `--clip-model toy` load through the same code as real
models do.
"""

from __future__ import annotations

import json
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

from recare_cli.errors import RecareError

TOY_DIR = Path(__file__).resolve().parent.parent / "data" / "toy"
TOY_JSON = "toy.json"
TOY_WEIGHTS = "toy.safetensors"


def manifest(folder: Path = TOY_DIR) -> dict:
    path = folder / TOY_JSON
    if not path.is_file():
        raise RecareError(f"the toy model is not in this installation ({path} is missing)",
                          hint="reinstall recare, or rebuild it with `recare toy train`")
    return json.loads(path.read_text(encoding="utf-8"))


def weights(prefix: str, folder: Path = TOY_DIR, vocab_size: int | None = None) -> dict:
    """The shipped tensors under `prefix.` (prefix removed), float32, the packed embedding table
    (if any) unpacked to `vocab_size` rows."""
    from safetensors.torch import load_file

    everything = load_file(str(folder / TOY_WEIGHTS))
    part = {k[len(prefix) + 1:]: v for k, v in everything.items() if k.startswith(prefix + ".")}
    for key in [k[:-len(".rows")] for k in part if k.endswith(".rows")]:
        unpack_rows(part, key, (vocab_size, part[f"{key}.rows"].shape[1]))
    return {k: (v.float() if v.is_floating_point() else v) for k, v in part.items()}


def pack_rows(state: dict, key: str, row_ids: torch.Tensor) -> None:
    """Replace an embedding table by the rows that were trained (`key.ids`, `key.rows`)."""
    table = state.pop(key)
    state[f"{key}.ids"] = row_ids.to(torch.int64).clone()
    state[f"{key}.rows"] = table[row_ids]


def text_embedding_key(state: dict) -> str:
    """transformers' CLIPTextModel state-dict keys differ between major versions (`text_model.` or not)."""
    return next(k for k in state if k.startswith("text_encoder.") and k.endswith("embeddings.token_embedding.weight"))


def unpack_rows(state: dict, key: str, shape: tuple[int, int]) -> None:
    """The inverse of pack_rows: rows that were never trained are zero."""
    row_ids, rows = state.pop(f"{key}.ids"), state.pop(f"{key}.rows")
    table = torch.zeros(shape, dtype=rows.dtype)
    table[row_ids] = rows
    state[key] = table


def build_vae(config: dict, state: dict):
    """The toy AutoencoderKL of a toy config, with `state` loaded, in eval mode and frozen."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(**config["vae"]["model"], scaling_factor=config["vae"]["scaling_factor"])
    vae.load_state_dict(state)
    return vae.eval().requires_grad_(False)


def build_pipeline(folder: Path, source: Path = TOY_DIR) -> None:
    """Write the toy text-to-image model as a standard diffusers StableDiffusionPipeline folder."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from recare_cli.clipvocab import build_tokenizer

    info = manifest(source)
    config = info["config"]
    vae = build_vae(config, weights("vae", source))
    unet = UNet2DConditionModel(**config["unet"]["model"])
    unet.load_state_dict(weights("unet", source))
    text_config = CLIPTextConfig(**config["text_encoder"])
    text_encoder = CLIPTextModel(text_config)
    text_encoder.load_state_dict(weights("text_encoder", source, text_config.vocab_size))
    with tempfile.TemporaryDirectory() as tokenizer_src:
        tokenizer = build_tokenizer(Path(tokenizer_src), config["text_encoder"]["max_position_embeddings"])
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=DDIMScheduler.from_config(config["scheduler"]),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)


def clip_files(source: Path = TOY_DIR) -> tuple[dict, dict]:
    """The toy CLIP's open_clip config and its state dict."""
    info = manifest(source)
    clip_config = {"model_cfg": info["config"]["clip"]["model_cfg"], "preprocess_cfg": info["config"]["clip"]["preprocess_cfg"]}
    return clip_config, weights("clip", source, clip_config["model_cfg"]["text_cfg"]["vocab_size"])


@lru_cache(maxsize=1)
def load_classifier():
    """The ground-truth classifier (recare_cli/toy/classifier.py) with the shipped weights."""
    from recare_cli.toy.classifier import ToyClassifier

    classifier = ToyClassifier()
    classifier.load_state_dict(weights("classifier"))
    return classifier.eval()


def write_word_list(path: Path) -> Path:
    """The toy world's words, one a line: the candidate list of toy CARE sets."""
    from recare_cli.fsutil import write_text
    from recare_cli.toy import world

    write_text(path, "\n".join(world.WORLD_WORDS) + "\n")
    return path
