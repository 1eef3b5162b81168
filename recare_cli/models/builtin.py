"""The built-in models (`tiny-random`, `tiny-random-v`, `tiny-random-xl`, `toy`): written once into
recare's cache from the package's data files, then loaded like any diffusers folder."""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Callable

from recare_cli import cache
from recare_cli.errors import RecareError
from recare_cli.output import quiet_libraries

DATA = Path(__file__).resolve().parent.parent / "data"


def package_config(name: str) -> dict:
    return json.loads((DATA / f"{name}.json").read_text())


def build_tiny_random(folder: Path, config_name: str = "tiny-random") -> None:
    """Write an SD-1.x/2.x-shaped random-weight pipeline from its package config to `folder`.

    `tiny-random` is shared/spec/tiny-random.md's SD 1.x shape; `tiny-random-v` the SD 2.x 768 one.
    """
    import diffusers
    from diffusers import StableDiffusionPipeline

    from recare_cli.clipvocab import build_tokenizer

    quiet_libraries()
    config = package_config(config_name)
    unet, vae, text_encoder = _seeded_parts(config)
    with tempfile.TemporaryDirectory() as tokenizer_src:
        tokenizer = build_tokenizer(Path(tokenizer_src), **config["tokenizer"])
    scheduler_class = getattr(diffusers, config.get("scheduler_class", "PNDMScheduler"))
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=scheduler_class.from_config(config["scheduler"]),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)


def _seeded_parts(config: dict):
    """The UNet, VAE and (first) text encoder of a built-in random model, each from its own seed."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(config["seed"])
    unet = UNet2DConditionModel(**config["unet"])
    torch.manual_seed(config["seed"] + 1)
    vae = AutoencoderKL(**config["vae"])
    torch.manual_seed(config["seed"] + 2)
    return unet, vae, CLIPTextModel(CLIPTextConfig(**config["text_encoder"]))


def build_tiny_random_xl(folder: Path) -> None:
    """Write the SDXL-shaped random-weight pipeline (data/tiny-random-xl.json) to `folder`."""
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from recare_cli.clipvocab import build_tokenizer

    quiet_libraries()
    config = package_config("tiny-random-xl")
    unet, vae, text_encoder = _seeded_parts(config)
    torch.manual_seed(config["seed"] + 3)
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**config["text_encoder_2"]))
    with tempfile.TemporaryDirectory() as tokenizer_src:
        tokenizer = build_tokenizer(Path(tokenizer_src), **config["tokenizer"])
        tokenizer_2 = build_tokenizer(Path(tokenizer_src), **config["tokenizer_2"])
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=EulerDiscreteScheduler.from_config(config["scheduler"]),
        add_watermarker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)


def build_toy(folder: Path) -> None:
    """Write the trained toy model shipped in recare_cli/data/toy/ (recare_cli/toy/)."""
    from recare_cli.toy.package import build_pipeline

    quiet_libraries()
    build_pipeline(folder)


TOY_FILES = ("toy/toy.json", "toy/toy.safetensors")  # under recare_cli/data/; also the toy CLIP's source

# name -> (builder, package data files whose hash decides when a cached copy is stale)
BUILTIN_MODELS: dict[str, tuple[Callable[[Path], None], tuple[str, ...]]] = {
    "tiny-random": (build_tiny_random, ("tiny-random.json",)),
    "tiny-random-v": (lambda folder: build_tiny_random(folder, "tiny-random-v"), ("tiny-random-v.json",)),
    "tiny-random-xl": (build_tiny_random_xl, ("tiny-random-xl.json",)),
    "toy": (build_toy, TOY_FILES),
}


def builtin_digest(files: tuple[str, ...]) -> str:
    digest = hashlib.sha256()
    for name in files:
        path = DATA / name
        if not path.is_file():
            raise RecareError(f"the built-in model's file {path} is missing from this installation",
                              hint="reinstall recare")
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def builtin_path(name: str, cache_dir: Path | None = None) -> Path:
    """The built-in model's folder in recare's cache, building it on first use."""
    builder, files = BUILTIN_MODELS[name]
    return cache.built_entry(cache.cache_root(cache_dir), "models", name, builtin_digest(files), builder)
