"""What every format writer shares: the erased UNet in the pipeline, the safetensors header, the stored dtype."""

from __future__ import annotations

from recare_cli import __version__
from recare_cli.export.check import _torch_dtype
from recare_cli.export.settings import ExportSettings
from recare_cli.export.source import ExportSource
from recare_cli.models import ModelRef, apply_unet_weights


def _erased_pipeline(pipe, source: ExportSource) -> dict:
    """Put the source's UNet into `pipe` (checked against the base's shapes); return its weights."""
    apply_unet_weights(pipe.unet, source.unet_state, source.spec, argument="export source")
    return source.unet_state


def _metadata(source: ExportSource, ref: ModelRef, settings: ExportSettings, **extra) -> dict[str, str]:
    """The safetensors header every export carries (the keys `recare erase` writes, plus the export's)."""
    return {
        "format": "pt",
        "concept": ", ".join(source.concepts),
        "method": source.method or "",
        "base_model": ref.spec,
        "recare_version": __version__,
        "export_format": settings.format,
        "dtype": settings.dtype,
        **{k: str(v) for k, v in extra.items()},
    }



def _cast(state: dict, dtype_name: str) -> dict:
    dtype = _torch_dtype(dtype_name)
    return {k: v.detach().to("cpu", dtype).contiguous() for k, v in state.items()}
