"""The toy world's ground-truth classifier: which shape, colour, background and style an image shows.

Trained on the procedural labels (and on VAE reconstructions, so generated images are in its
distribution); it is how `bench/toy_quality.py` decides whether a concept "appears".
"""

from __future__ import annotations

import torch
from torch import nn

from recare_cli.toy import world

HEADS = {"shape": world.SHAPE_LABELS, "colour": tuple(world.COLOURS), "background": tuple(world.BACKGROUNDS),
         "style": world.STYLES}


def _block(channels_in: int, channels_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(channels_in, channels_out, 3, padding=1), nn.GroupNorm(8, channels_out), nn.SiLU(),
                         nn.Conv2d(channels_out, channels_out, 3, padding=1), nn.GroupNorm(8, channels_out), nn.SiLU())


class ToyClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(_block(3, 32), nn.AvgPool2d(2), _block(32, 64), nn.AvgPool2d(2),
                                      _block(64, 128), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.heads = nn.ModuleDict({name: nn.Linear(128, len(labels)) for name, labels in HEADS.items()})

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per head for images in [-1, 1], [n, 3, 32, 32]."""
        features = self.features(pixels)
        return {name: head(features) for name, head in self.heads.items()}


def to_pixels(images) -> torch.Tensor:
    """PIL images or a uint8 [n, H, W, 3] array → [n, 3, 32, 32] floats in [-1, 1]."""
    import numpy as np

    if not isinstance(images, np.ndarray):
        images = np.stack([np.asarray(im.convert("RGB").resize((world.SIZE, world.SIZE))) for im in images])
    pixels = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    return pixels / 127.5 - 1.0


@torch.no_grad()
def predict(classifier: ToyClassifier, images, batch_size: int = 256) -> dict[str, list[str]]:
    """The label the classifier gives each image, per head."""
    pixels = to_pixels(images)
    out: dict[str, list[str]] = {name: [] for name in HEADS}
    for start in range(0, len(pixels), batch_size):
        logits = classifier(pixels[start:start + batch_size])
        for name, labels in HEADS.items():
            out[name] += [labels[i] for i in logits[name].argmax(dim=-1).tolist()]
    return out
