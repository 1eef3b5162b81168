"""Known concepts, so `recare erase --concept nudity` needs no other input (recare-method.md §8).

A preset fixes the concept type, the initializer of the adversarial tokens and the prompt whose
images stand for the concept; any other concept takes the same three from its `--type`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from recare_cli.errors import UsageError


@dataclass(frozen=True)
class Preset:
    concept_type: str
    initializer_token: str
    image_prompt: str


PRESETS = {
    "nudity": Preset("object", "person", "A photo of a nude person"),
    "Van Gogh": Preset("style", "art", "A painting in the style of Van Gogh"),
    # The toy world's (recare_cli/toy/world.py), for `--model toy`: its captions call any shape
    # "shape" now and then, and put styles "in the style of" a word.
    "star": Preset("object", "shape", "a star"),
    "stripes": Preset("style", "style", "a picture in the style of stripes"),
}

# Erase settings a built-in model needs instead of the spec's, which are tuned for Stable
# Diffusion's weights and 512-px images; flags typed or set in the config file still win.
# The toy model's were found by measurement (bench/toy_quality.py, bench/toy_lr_sweep.py,
# bench/toy_defaults_sweep.py; docs/benchmarks.md, docs/frontier.md).
TOY_WORDS = Path(__file__).resolve().parent / "data" / "toy" / "words.txt"
MODEL_DEFAULTS: dict[str, dict] = {
    "toy": {"resolution": 32, "num_images": 128, "iterations": 300, "stage1_lr": 3e-4, "stage2_lr": 1e-4,
            "ti_steps": 1000, "care_vocab": TOY_WORDS, "care_top_k": 5, "care_top_n": 12,
            "care_min_cluster_size": 3},
}
# Why 128 images on the toy: over three seeds they erased more and kept more than 64 or 32, with
# both ReCARE variants (bench/toy_defaults_sweep.py --num-images 64,128,32; docs/frontier.md).
# Why care_min_cluster_size 3 on the toy: only ~9 of its 13 words rank in the images' top 5, so 7
# clusters are mostly pairs; the leave-one-out refinement then compares two different words and
# always drops the one nearer the concept (night, beside star in 90% of scenes). A pair has no outlier.
# A method's own settings on a built-in model, over MODEL_DEFAULTS. ESD's published rate (2e-5) is
# the spec's stage-2 rate; the toy scales it as it scales stage 2 (2e-5 -> 1e-4), with the toy's 300
# iterations and ESD's own eta (docs/frontier.md shows the sweep around it).
MODEL_METHOD_DEFAULTS: dict[tuple[str, str], dict] = {
    ("toy", "esd"): {"stage1_lr": 1e-4},
}


def with_model_defaults(request, model: str, explicit: set[str]):
    """`request` with the model's own defaults (for its method) for every field the user did not set."""
    from dataclasses import replace

    own = MODEL_DEFAULTS.get(model, {}) | MODEL_METHOD_DEFAULTS.get((model, request.method), {})
    defaults = {k: v for k, v in own.items() if k not in explicit}
    return replace(request, **defaults) if defaults else request


@dataclass(frozen=True)
class ConceptPlan:
    """Everything a run needs to know about one concept."""

    concept: str
    concept_type: str
    templates: tuple[str, ...]
    care_style: str  # photo | style
    initializer_token: str
    image_prompt: str
    preset: bool


def preset_key(concept: str) -> str:
    return re.sub(r"[^a-z0-9]", "", concept.lower())


def slug(concept: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", concept.lower()).strip("-") or "concept"


def plan_concept(concept: str, concept_type: str | None = None, initializer_token: str | None = None) -> ConceptPlan:
    """The preset for a known concept, else the defaults of `--type` (which is then required)."""
    from recare_cli.plugins import registry

    if not concept.strip():
        raise UsageError("--concept is empty")
    preset = next((p for name, p in PRESETS.items() if preset_key(name) == preset_key(concept)), None)
    if preset is not None and concept_type in (None, preset.concept_type):
        kind = registry().concept_type(preset.concept_type)
        return ConceptPlan(concept, kind.name, kind.templates, kind.care_style,
                           initializer_token or preset.initializer_token, preset.image_prompt, True)
    if concept_type is None:
        known = ", ".join(PRESETS)
        raise UsageError(
            f"'{concept}' is not a known concept, so recare cannot guess how to erase it (known: {known})",
            hint="pass --type object, style or person",
        )
    kind = registry().concept_type(concept_type)
    return ConceptPlan(concept, kind.name, kind.templates, kind.care_style,
                       initializer_token or kind.initializer_token, kind.target_prompt.format(concept), False)
