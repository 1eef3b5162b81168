"""Format `single-file`: one original-layout (LDM) checkpoint, loaded back with `from_single_file`."""

from __future__ import annotations

import tempfile
from pathlib import Path

from recare_cli.export.check import (
    TOLERANCE, _components, _load_kwargs, max_abs_diff, require_same_weights, unet_probe,
)
from recare_cli.export.keymaps import pipeline_to_ldm, text_encoder_layout
from recare_cli.export.settings import ExportResult
from recare_cli.export.writing import _cast, _erased_pipeline, _metadata
from recare_cli.models import is_sdxl


def write_pipeline_configs(pipe, folder: Path) -> None:
    """The base pipeline's configs without weights: what `from_single_file(config=...)` reads offline."""
    pipe.save_config(folder)
    for name in ("unet", "vae", "scheduler"):
        getattr(pipe, name).save_config(folder / name)
    for suffix in ("", "_2") if is_sdxl(pipe) else ("",):
        getattr(pipe, f"text_encoder{suffix}").config.save_pretrained(folder / f"text_encoder{suffix}")
        getattr(pipe, f"tokenizer{suffix}").save_pretrained(folder / f"tokenizer{suffix}")
    if getattr(pipe, "feature_extractor", None) is not None:  # SD 1.x hub repos ship one, and the model index names it
        pipe.feature_extractor.save_pretrained(folder / "feature_extractor")


def _export_single_file(pipe, ref, source, settings, staged: Path, reporter) -> ExportResult:
    from safetensors.torch import save_file

    _erased_pipeline(pipe, source)
    reference = unet_probe(pipe.unet)
    layout = text_encoder_layout(pipe)
    save_file(_cast(pipeline_to_ldm(pipe), settings.dtype), str(staged),
              metadata=_metadata(source, ref, settings, text_encoder_layout=layout))

    with tempfile.TemporaryDirectory(prefix=".recare-config-", dir=staged.parent) as config_dir:
        write_pipeline_configs(pipe, Path(config_dir))
        loaded = type(pipe).from_single_file(str(staged), config=config_dir, **_load_kwargs(settings.dtype, pipe))
    for name in _components(pipe):
        require_same_weights(_cast(getattr(pipe, name).state_dict(), settings.dtype),
                             getattr(loaded, name).state_dict(), f"{name} of the single file")
    diff = max_abs_diff(unet_probe(loaded.unet.to(pipe.device)), reference)
    return ExportResult("single-file", "", ref.spec, settings.dtype, diff, TOLERANCE[settings.dtype],
                        "the source UNet", details={"text_encoder_layout": layout})
