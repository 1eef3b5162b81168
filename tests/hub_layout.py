"""A Stable Diffusion 1.4 pipeline as people have it: a hub repo in the Hugging Face cache, with a safety checker.

Tiny random weights (tiny-random's UNet, VAE and text encoder), plus the two components every SD
1.4/1.5 checkpoint ships and recare's built-ins lack: `safety_checker/` (a
StableDiffusionSafetyChecker on a tiny CLIP vision tower) and `feature_extractor/` (a
CLIPImageProcessor, preprocessor_config.json). Written the way `huggingface_hub` writes a download:
`hub/models--CompVis--stable-diffusion-v1-4/{blobs,refs/main,snapshots/<revision>/…}`, every
snapshot file a symlink to its content-addressed blob.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

REPO_ID = "CompVis/stable-diffusion-v1-4"
REVISION = "133a221b8aa7292a167afc5127cb63fb5005638b"  # the real repo's main at the time of v1-4's release
IMAGE_SIZE = 32  # the safety checker's CLIP vision input side (the real one's is 224)


def build_pipeline_folder(folder: Path, tiny_model: Path) -> None:
    """tiny-random with a safety checker and a feature extractor, saved as a diffusers folder."""
    import torch
    from diffusers import StableDiffusionPipeline
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    base = StableDiffusionPipeline.from_pretrained(str(tiny_model), safety_checker=None, requires_safety_checker=False)
    torch.manual_seed(0)
    checker = StableDiffusionSafetyChecker(CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 1},
        vision_config={"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 1,
                       "image_size": IMAGE_SIZE, "patch_size": 8},
        projection_dim=16,
    ))
    extractor = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    pipe = StableDiffusionPipeline(
        vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=base.unet,
        scheduler=base.scheduler, safety_checker=checker, feature_extractor=extractor, requires_safety_checker=True,
    )
    pipe.save_pretrained(folder, safe_serialization=True)


def write_hub_cache(hf_home: Path, pipeline_folder: Path, repo_id: str = REPO_ID, revision: str = REVISION) -> Path:
    """Put `pipeline_folder` into `hf_home`'s hub cache as huggingface_hub lays out a download; the snapshot path."""
    repo = Path(hf_home) / "hub" / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / revision
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    for source in sorted(p for p in pipeline_folder.rglob("*") if p.is_file()):
        data = source.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / source.relative_to(pipeline_folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return snapshot


def hub_cache_copy(tiny_model: Path, hf_home: Path) -> Path:
    """Build the pipeline once in a scratch folder and lay it out under `hf_home`; the snapshot path."""
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / "pipe"
        build_pipeline_folder(folder, tiny_model)
        return write_hub_cache(hf_home, folder)
