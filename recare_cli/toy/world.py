"""The toy world: procedural 32x32 scenes with captions and ground-truth labels.

Every scene is one shape (or none) of one colour on one background, sometimes in a striped style.
The world is built with co-occurrence, the situation ReCARE is for: stars are almost always at
night and stripes almost always on grass, so erasing `star` or `stripes` naively damages `night` or
`grass`. Captions use few words, always the same ones, and often leave attributes out, so short
prompts ("a star", "night", "a photo of grass") mean something to a model trained on them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SIZE = 32
SUPERSAMPLE = 4  # shapes are drawn at 4x and downsampled, for clean anti-aliased edges

SHAPES = ("star", "circle", "square", "triangle")
NO_SHAPE = "none"
SHAPE_LABELS = SHAPES + (NO_SHAPE,)
COLOURS = {"red": (220, 40, 40), "yellow": (240, 215, 40), "blue": (40, 90, 235), "white": (245, 245, 245)}
BACKGROUNDS = {"night": ((10, 14, 48), (28, 34, 84)), "sky": ((120, 190, 240), (175, 220, 250)),
               "grass": ((96, 170, 70), (40, 110, 40))}  # top and bottom colour of a vertical gradient
STYLES = ("plain", "stripes")
GENERIC_SHAPE = "shape"  # captions sometimes say "shape" for any shape: the adversarial tokens' initializer

# Co-occurrence: P(background | shape) and P(background | stripes).
STAR_AT_NIGHT = 0.9
STRIPES_ON_GRASS = 0.9
P_STRIPES = 0.25
P_NO_SHAPE = 0.05

PREPOSITIONS = {"night": ("at night", "in the night"), "sky": ("in the sky", "in the sky"),
                "grass": ("on grass", "on the grass")}
PREFIXES = ("", "", "a photo of ", "a picture of ")

# The words that name things in the toy world: the candidates of toy CARE sets (`--care-vocab`).
# Words outside the captions are not candidates: their embedding rows were never trained, and
# untrained rows rank high against every image (measured: they crowded "night" out of star's CARE set).
WORLD_WORDS = SHAPES + tuple(COLOURS) + tuple(BACKGROUNDS) + ("stripes", GENERIC_SHAPE)


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    background: str
    style: str
    size: float
    x: float
    y: float
    angle: float

    def labels(self) -> dict[str, int]:
        return {"shape": SHAPE_LABELS.index(self.shape), "colour": list(COLOURS).index(self.colour),
                "background": list(BACKGROUNDS).index(self.background), "style": STYLES.index(self.style)}


def sample_scene(rng: np.random.Generator) -> Scene:
    shape = NO_SHAPE if rng.random() < P_NO_SHAPE else SHAPES[rng.integers(len(SHAPES))]
    style = "stripes" if rng.random() < P_STRIPES else "plain"
    others = [b for b in BACKGROUNDS]
    if style == "stripes":
        background = "grass" if rng.random() < STRIPES_ON_GRASS else str(rng.choice(["night", "sky"]))
    elif shape == "star":
        background = "night" if rng.random() < STAR_AT_NIGHT else str(rng.choice(["sky", "grass"]))
    else:
        background = others[rng.integers(len(others))]
    colour = list(COLOURS)[rng.integers(len(COLOURS))]
    size = float(rng.uniform(7.0, 10.0))  # circumradius in pixels
    margin = size + 1
    return Scene(shape, colour, background, style, size, float(rng.uniform(margin, SIZE - margin)),
                 float(rng.uniform(margin, SIZE - margin)), float(rng.uniform(-0.3, 0.3)))


def _polygon(scene: Scene) -> list[tuple[float, float]]:
    s, r = SUPERSAMPLE, scene.size
    if scene.shape == "star":
        radii = [r if i % 2 == 0 else r * 0.45 for i in range(10)]
        angles = [scene.angle - np.pi / 2 + i * np.pi / 5 for i in range(10)]
    elif scene.shape == "triangle":
        radii = [r] * 3
        angles = [scene.angle - np.pi / 2 + i * 2 * np.pi / 3 for i in range(3)]
    else:  # square
        radii = [r * 0.9] * 4
        angles = [scene.angle + np.pi / 4 + i * np.pi / 2 for i in range(4)]
    return [((scene.x + rad * np.cos(a)) * s, (scene.y + rad * np.sin(a)) * s) for rad, a in zip(radii, angles)]


def render(scene: Scene) -> np.ndarray:
    """The scene as a uint8 [32, 32, 3] RGB array."""
    from PIL import Image, ImageDraw

    big = SIZE * SUPERSAMPLE
    top, bottom = (np.array(c, dtype=np.float32) for c in BACKGROUNDS[scene.background])
    ramp = np.linspace(0.0, 1.0, big, dtype=np.float32)[:, None, None]
    canvas = np.broadcast_to(top * (1 - ramp) + bottom * ramp, (big, big, 3)).astype(np.uint8)
    image = Image.fromarray(np.ascontiguousarray(canvas))
    draw = ImageDraw.Draw(image)
    colour = COLOURS[scene.colour]
    if scene.shape == "circle":
        r = scene.size * 0.85 * SUPERSAMPLE
        cx, cy = scene.x * SUPERSAMPLE, scene.y * SUPERSAMPLE
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif scene.shape != NO_SHAPE:
        draw.polygon(_polygon(scene), fill=colour)
    pixels = np.asarray(image.resize((SIZE, SIZE), Image.Resampling.BOX), dtype=np.float32)
    if scene.style == "stripes":
        # Bands of 4 rows line up with the VAE's 4x4 latent cells, so the style survives encoding.
        dark = (np.arange(SIZE) // 4) % 2 == 0
        pixels[dark] *= 0.45
    return pixels.round().clip(0, 255).astype(np.uint8)


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """A caption that names each attribute with some probability, always with the same words."""
    shape_word = GENERIC_SHAPE if scene.shape != NO_SHAPE and rng.random() < 0.1 else scene.shape
    use_shape = scene.shape != NO_SHAPE and rng.random() < 0.9
    use_colour = use_shape and rng.random() < 0.6
    use_background = rng.random() < (0.7 if use_shape else 1.0)
    use_style = scene.style == "stripes" and rng.random() < 0.85
    words = []
    if use_shape:
        words.append("a " + (f"{scene.colour} " if use_colour else "") + shape_word)
        if use_background:
            words.append(PREPOSITIONS[scene.background][rng.integers(2)])
    elif use_background:
        words.append(scene.background)
    text = " ".join(words)
    if use_style:
        text = f"{text}, stripes" if text and rng.random() < 0.5 else f"{text} in the style of stripes".strip()
    if not text:
        return ""
    return PREFIXES[rng.integers(len(PREFIXES))] + text


def make_dataset(n: int, seed: int) -> tuple[np.ndarray, list[str], dict[str, np.ndarray]]:
    """n scenes: uint8 images [n, 32, 32, 3], one caption each, integer labels per attribute."""
    rng = np.random.default_rng(seed)
    images = np.empty((n, SIZE, SIZE, 3), dtype=np.uint8)
    captions: list[str] = []
    labels: dict[str, list[int]] = {"shape": [], "colour": [], "background": [], "style": []}
    for i in range(n):
        scene = sample_scene(rng)
        images[i] = render(scene)
        captions.append(caption(scene, rng))
        for key, value in scene.labels().items():
            labels[key].append(value)
    return images, captions, {k: np.asarray(v, dtype=np.int64) for k, v in labels.items()}
