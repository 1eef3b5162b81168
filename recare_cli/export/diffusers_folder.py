"""Format `diffusers`: the whole pipeline folder, with the base's safety checker and a model card."""

from __future__ import annotations

import json
from pathlib import Path

from recare_cli import __version__
from recare_cli.errors import RecareError
from recare_cli.export.check import (
    TOLERANCE, _components, _load_kwargs, _torch_dtype, max_abs_diff, require_same_weights, unet_probe,
)
from recare_cli.export.settings import FILE_SUFFIX, ExportResult, ExportSettings
from recare_cli.export.source import ExportSource
from recare_cli.export.writing import _cast, _erased_pipeline, _metadata
from recare_cli.models import ModelRef, is_sdxl

MODEL_CARD = "README.md"


def base_safety_checker(ref: ModelRef):
    """The base pipeline's safety checker (recare's loads leave it out), or None when it has none."""
    index_path = Path(ref.path) / "model_index.json"
    if not index_path.is_file():
        return None  # a single file or a built-in: nothing to keep
    library, class_name = (json.loads(index_path.read_text(encoding="utf-8")).get("safety_checker") or [None, None])
    if class_name is None:
        return None
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    if class_name != StableDiffusionSafetyChecker.__name__:
        raise RecareError(f"the base model's safety checker is a {library}.{class_name}, which recare cannot export",
                          hint="pass --no-safety-checker to export without it")
    return StableDiffusionSafetyChecker.from_pretrained(Path(ref.path) / "safety_checker", local_files_only=True)



def _export_diffusers(pipe, ref, source, settings, staged: Path, reporter) -> ExportResult:
    from safetensors.torch import load_file, save_file

    _erased_pipeline(pipe, source)
    reference = unet_probe(pipe.unet)
    checker = base_safety_checker(ref) if settings.safety_checker else None
    if not is_sdxl(pipe):  # SDXL pipelines have no safety checker
        pipe.register_modules(safety_checker=checker)
        pipe.register_to_config(requires_safety_checker=checker is not None)
    variant = None if settings.dtype == "fp32" else settings.dtype
    pipe.to(_torch_dtype(settings.dtype))
    pipe.save_pretrained(staged, safe_serialization=True, variant=variant)
    metadata = _metadata(source, ref, settings)
    for unet_file in sorted((staged / "unet").glob(f"*{FILE_SUFFIX}")):
        save_file(load_file(str(unet_file)), str(unet_file), metadata=metadata)

    loaded = type(pipe).from_pretrained(staged, variant=variant, **_load_kwargs(settings.dtype, pipe, checker is not None))
    for name in _components(pipe) + (("safety_checker",) if checker is not None else ()):
        require_same_weights(_cast(getattr(pipe, name).state_dict(), settings.dtype),
                             getattr(loaded, name).state_dict(), f"{name} of the pipeline folder")
    diff = max_abs_diff(unet_probe(loaded.unet.to(pipe.device)), reference)
    load_options = f', variant="{variant}", torch_dtype={_torch_dtype(settings.dtype)}' if variant else ""
    write_model_card(staged, source, ref, settings, diff,
                     [f'pipe = {type(pipe).__name__}.from_pretrained("{settings.output}"{load_options})'],
                     type(pipe).__name__)
    files = sorted(str(p.relative_to(staged)) for p in staged.rglob("*") if p.is_file())
    return ExportResult("diffusers", "", ref.spec, settings.dtype, diff, TOLERANCE[settings.dtype],
                        "the source UNet", files, {"variant": variant})


def write_model_card(folder: Path, source: ExportSource, ref: ModelRef, settings: ExportSettings,
                     diff: float, usage: list[str], pipeline_class: str = "StableDiffusionPipeline") -> None:
    concepts = ", ".join(source.concepts) or "(unknown concept)"
    front = ["---", "library_name: diffusers", "tags:", "  - recare", "  - concept-erasure", "  - stable-diffusion"]
    if ref.kind == "hub":
        front.append(f"base_model: {ref.spec}")
    front.append("---")
    body = [
        f"# {concepts} erased with ReCARE",
        "",
        f"Exported by recare {__version__} (`recare export --format {settings.format}`).",
        "",
        "| | |", "|---|---|",
        f"| concept | {concepts} |",
        f"| method | {source.method or 'unknown'} |",
        f"| base model | {ref.spec} |",
        f"| recare version | {__version__} |",
        f"| format | {settings.format} ({settings.dtype}) |",
        "",
        "## Loading", "", "```python", "import torch", f"from diffusers import {pipeline_class}", "",
        *usage, "```", "",
        "## Check", "",
        f"Loaded back after writing and compared with the source: max abs difference {diff:.3g} "
        f"(tolerance {TOLERANCE[settings.dtype]:g} for {settings.dtype}).",
        "",
    ]
    (folder / MODEL_CARD).write_text("\n".join(front + [""] + body), encoding="utf-8")
