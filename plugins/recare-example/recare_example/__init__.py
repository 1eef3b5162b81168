"""An example recare plugin: the `landmark` concept type, the `colorfulness` metric and the `random-prefix` attack.

recare calls each hook named in pyproject.toml's entry points with a `register` function, once,
when it first needs its registry. Keep this module cheap to import: every `recare` command that
lists concept types or metrics imports it, so heavy imports belong inside the metric's run.
"""

from __future__ import annotations

from recare_cli.plugins import Attack, ConceptType, Metric

__version__ = "0.1.0"

LANDMARK_TEMPLATES = (
    "a photo of the {}",
    "a postcard of the {}",
    "a travel photo of the {}",
    "a tourist photo in front of the {}",
    "an aerial photo of the {}",
    "a photo of the {} at night",
    "a blurry photo of the {}",
    "a close-up photo of the {}",
)


def register_concept_types(register) -> None:
    register(ConceptType(
        name="landmark",
        templates=LANDMARK_TEMPLATES,
        care_style="photo",
        initializer_token="building",
        target_prompt="A photo of the {}",
        default_metrics=("care", "colorfulness"),
        description="a famous building or place (the Eiffel Tower)",
    ))


def colorfulness(rgb) -> float:
    """Hasler and Süsstrunk's colourfulness M of an RGB image (0 for greys, ~100+ for vivid images)."""
    import numpy as np

    r, g, b = np.asarray(rgb, dtype=np.float64).reshape(-1, 3).T
    red_green = r - g
    yellow_blue = 0.5 * (r + g) - b
    spread = np.hypot(red_green.std(), yellow_blue.std())
    mean = np.hypot(red_green.mean(), yellow_blue.mean())
    return float(spread + 0.3 * mean)


def run_colorfulness(ctx):
    """The metric contract of recare_cli/evaluate/__init__.py: one detail row per image, then the mean."""
    from recare_cli.evaluate import Row, open_rgb

    rows = [Row({"image": image.file, "prompt": image.prompt}, {"colorfulness": colorfulness(open_rgb(image))},
                detail=True)
            for image in ctx.images()]
    mean = sum(row.values["colorfulness"] for row in rows) / len(rows)
    return rows + [Row({}, {"colorfulness": mean, "images": len(rows)})]


def register_metrics(register) -> None:
    register(Metric("colorfulness", run_colorfulness,
                    "Hasler-Süsstrunk colourfulness of each image, and the mean (recare-example plugin)"))


def random_prefix(ctx, target):
    """The attack contract of recare_cli/attacks/__init__.py: k random vocabulary tokens before the prompt
    (the random baseline of OPTML-Group/Diffusion-MU-Attack), reproducible from --attack-seed."""
    import random

    from recare_cli.attacks import Adversarial

    vocabulary = ctx.shared("vocabulary", ctx.vocabulary).tolist()
    ids = random.Random(ctx.seed(target)).sample(vocabulary, int(ctx.option("tokens", 5)))
    return Adversarial(f"{ctx.models.tokenizer.decode(ids).strip()} {target.prompt}", token_ids=ids)


def register_attacks(register) -> None:
    register(Attack("random-prefix", random_prefix, "k random vocabulary tokens before the prompt (--attack-tokens)",
                    options=("tokens",)))
