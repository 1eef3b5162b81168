"""An erase run's inputs: the training images (given or generated) and the CARE set (given or built).

ReCARE reads both; UCE reads the CARE set with `--preserve careset`; ESD neither.
"""

from __future__ import annotations

import shutil
from contextlib import nullcontext
from pathlib import Path

from recare_cli.careset.file import CARESET_FILE
from recare_cli.fsutil import atomic_path, write_json
from recare_cli.models import Runtime
from recare_cli.presets import slug

STAGES_DIR = "stages"
IMAGES_DIR = "images"


def training_images(request, plans, run_dir: Path, runtime: Runtime, models, stages, reporter) -> dict[str, Path]:
    """Concept -> its image folder: --images for all, or generated into the run directory."""
    if request.images is not None:
        return {p.concept: Path(request.images) for p in plans}
    import torch

    from recare_cli.generate import GenerateSettings, PromptRow, generate
    from recare_cli.models import resolve_dtype

    # Images are rendered in the run's dtype; when that is the training weights' float32 (the CPU
    # default), the pipeline already loaded for training renders them: one load, one copy in memory.
    same_dtype = resolve_dtype(runtime.dtype, models.device) == torch.float32

    folders = {p.concept: run_dir / IMAGES_DIR / slug(p.concept) for p in plans}
    # Once the stage has finished, a rerun keeps its recorded time and only fills in images that
    # have gone missing since (generate skips the ones present).
    finished = "images" in stages.record
    with nullcontext() if finished else stages.stage("images", total=None):
        for plan in plans:
            generate([PromptRow(plan.image_prompt)], folders[plan.concept], runtime,
                     GenerateSettings(height=request.resolution, width=request.resolution),
                     num_images=request.num_images, seed=request.seed, reporter=reporter,
                     pipe=models.pipe if same_dtype else None)
    if finished:
        stages.reused("images")
    return folders


def read_careset_file(path: Path):
    from recare_cli.careset import read_careset

    return read_careset(path)


def warn_foreign_careset(careset, concepts: list[str], path, reporter) -> None:
    """A CARE set keyed for another concept is most likely the wrong file: say so, train anyway."""
    from recare_cli.careset import careset_key

    keys = [careset_key(c) for c in concepts]
    if careset.key not in {*keys, "_".join(keys)}:
        reporter.warn(f"--careset '{path}' is keyed '{careset.key}_care_word', not for "
                      f"{', '.join(concepts)} (expected '{'_'.join(keys)}_care_word'); is it the right file?")


def clip_model_for(request, runtime: Runtime) -> str:
    from recare_cli.clip import default_clip_model

    return request.clip_model or default_clip_model(runtime.model)


def build_careset_for(request, plans, images_dirs, run_dir: Path, runtime: Runtime, stages, reporter):
    """One CARE set per concept from its images (reused when already built), merged into one."""
    from recare_cli.careset import CareSet, build_careset
    from recare_cli.clip import load_clip

    existing = run_dir / CARESET_FILE
    if existing.is_file():
        stages.reused("careset")
        return read_careset_file(existing)
    anchors, retains, keys = [], [], []
    with stages.stage("careset", total=None):
        clip = load_clip(clip_model_for(request, runtime), request.clip_pretrained, cache_dir=runtime.cache_dir,
                         offline=runtime.offline, device=runtime.torch_device())
        for plan in plans:
            built = build_careset(
                plan.concept, images_dirs[plan.concept], run_dir / STAGES_DIR / f"careset-{slug(plan.concept)}",
                prompt_style=plan.care_style, clip=clip, vocab_file=request.care_vocab,
                top_k_per_image=request.care_top_k, top_n_tokens=request.care_top_n,
                min_cluster_size=request.care_min_cluster_size, seed=request.seed,
                cache_dir=runtime.cache_dir, reporter=reporter,
            )
            careset = read_careset_file(Path(built.path))
            anchors += careset.anchor
            retains += careset.retain
            keys.append(careset.key)
    return CareSet(anchor=list(dict.fromkeys(anchors)), retain=list(dict.fromkeys(retains)), key="_".join(keys))


def write_careset(run_dir: Path, request, careset, plans) -> None:
    """careset.json in the run directory: the user's file as given, or the built one."""
    target = run_dir / CARESET_FILE
    if request.careset is not None:
        with atomic_path(target) as tmp:
            shutil.copyfile(request.careset, tmp)
    elif not target.is_file():
        retain_kind = "painting" if plans[0].care_style == "style" else "photo"
        write_json(target, {f"{careset.key}_care_word": careset.anchor,
                            f"{careset.key}_care_word_{retain_kind}": careset.retain})
