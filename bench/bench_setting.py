"""What bench/erase.py and bench/reference_structure.py share: the bench setting and its inputs.

Both time the same job (shared/spec/tiny-random.md's reference figure): 10 erase iterations,
150 inversion steps, 2 rounds, 2 adversarial concepts, 8 synthetic training images at 512 px and
a 3-word CARE set, on `tiny-random`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

SETTINGS = dict(iterations=10, ti_steps=150, rounds=2, num_adv_concepts=2, num_images=8, resolution=512)
CARESET = {"bench_care_word": ["A man", "A tree", "A beach"],
           "bench_care_word_photo": ["A photo of man", "A photo of tree", "A photo of beach"]}


def write_inputs(folder: Path, num_images: int, resolution: int) -> tuple[Path, Path]:
    """Synthetic training images (smooth colour fields, fixed seed) and a 3-word CARE set."""
    import numpy as np
    from PIL import Image

    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    grid = np.linspace(0, 1, resolution, dtype=np.float32)
    for i in range(num_images):
        colours = rng.uniform(0, 255, (3, 3))
        pixels = (colours[0] * grid[:, None, None] + colours[1] * grid[None, :, None]
                  + colours[2] * (1 - grid[:, None, None])) / 2
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(images / f"train_{i}.png")
    careset = folder / "careset.json"
    careset.write_text(json.dumps(CARESET))
    return images, careset


def forward_ms(model: str, cache_dir) -> float:
    """This machine's speed right now: median of 7 batch-2 forwards of the model's UNet on 64x64 latents."""
    import torch

    from recare_cli.models import Runtime

    pipe, _, _ = Runtime(model, device="cpu", dtype="fp32", offline=True, cache_dir=cache_dir).pipeline()
    latents = torch.randn(2, 4, 64, 64)
    embeds = torch.randn(2, 77, pipe.unet.config.cross_attention_dim)
    times = []
    with torch.no_grad():
        for _ in range(7):
            started = time.perf_counter()
            pipe.unet(latents, torch.tensor(500), encoder_hidden_states=embeds)
            times.append(time.perf_counter() - started)
    return sorted(times)[3] * 1000


def import_libraries() -> None:
    """Import torch, diffusers and transformers before a clock starts, so no timing includes them."""
    import importlib

    for module in ("torch", "diffusers.models.autoencoders.autoencoder_kl",
                   "diffusers.models.unets.unet_2d_condition", "diffusers.schedulers.scheduling_ddim",
                   "transformers.models.clip.modeling_clip", "transformers.models.clip.tokenization_clip"):
        importlib.import_module(module)


def in_fresh_process(script: Path, args: list[str]) -> dict:
    """Run a bench script in a new Python process and return what it wrote with --json-out.

    Each side of a same-machine comparison gets a process of its own, as it would have when run
    for real: neither inherits the other's warmed kernels or its process settings (recare's
    `keep_freed_memory` on a CPU is process-wide, and the reference never sets it).
    """
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory(prefix="recare-bench-json-") as tmp:
        out = Path(tmp) / "result.json"
        subprocess.run([sys.executable, str(script), *args, "--json-out", str(out)], check=True)
        return json.loads(out.read_text())
