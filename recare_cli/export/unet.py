"""Format `unet`: the UNet alone, in diffusers keys."""

from __future__ import annotations

from pathlib import Path

from recare_cli.export.check import TOLERANCE, max_abs_diff, require_same_weights, unet_probe
from recare_cli.export.settings import ExportResult
from recare_cli.export.writing import _cast, _erased_pipeline, _metadata
from recare_cli.models import apply_unet_weights


def _export_unet(pipe, ref, source, settings, staged: Path, reporter) -> ExportResult:
    from safetensors.torch import load_file, save_file

    _erased_pipeline(pipe, source)
    reference = unet_probe(pipe.unet)
    written = _cast(pipe.unet.state_dict(), settings.dtype)
    save_file(written, str(staged), metadata=_metadata(source, ref, settings))

    loaded = load_file(str(staged))
    require_same_weights(written, loaded, "UNet file")
    apply_unet_weights(pipe.unet, loaded, str(settings.output), argument="exported UNet")
    diff = max_abs_diff(unet_probe(pipe.unet), reference)
    return ExportResult("unet", "", ref.spec, settings.dtype, diff, TOLERANCE[settings.dtype], "the source UNet")
