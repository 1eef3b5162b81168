"""Random-noise PNGs for tests that need real image files whose content does not matter."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def noise_images(folder: Path, count: int, size: int | tuple[int, int] = 48, seed: int = 0) -> Path:
    """`count` images `noise_{i}.png` of `size` (a side, or height and width) in `folder`; returns it."""
    height, width = (size, size) if isinstance(size, int) else size
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(folder / f"noise_{i}.png")
    return folder
