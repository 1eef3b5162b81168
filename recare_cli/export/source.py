"""The export source: a run directory, its cache name, a UNet weights file or a diffusers UNet folder."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from recare_cli.cache import cache_root, lookup_erased
from recare_cli.errors import RecareError, UsageError
from recare_cli.export.settings import FILE_SUFFIX
from recare_cli.manifest import RUN_RECORD as MANIFEST
from recare_cli.models import TOKENS_FILE, UNET_FILE


@dataclass
class ExportSource:
    spec: str  # as typed
    unet_path: Path
    run_dir: Path | None = None
    tokens_path: Path | None = None
    base_model: str | None = None  # from the run manifest or the weights' metadata
    method: str | None = None
    concepts: list[str] = field(default_factory=list)
    unet_state: dict | None = field(default=None, repr=False)  # read by `export` before the base model loads


def resolve_source(spec: str, cache_dir: Path | None = None) -> ExportSource:
    """A run directory, the cache name of one, a UNet weights file, or a diffusers UNet folder."""
    path = Path(spec).expanduser()
    if not path.exists():
        run_dir = lookup_erased(cache_root(cache_dir), spec)
        if run_dir is None:
            raise UsageError(
                f"export source '{spec}': no such file or folder, and no erased model of that name in the cache",
                hint="pass a run directory, a UNet .safetensors/.pt file, or a name listed by `recare cache`",
            )
        return _run_source(spec, run_dir)
    if path.is_dir() and ((path / MANIFEST).is_file() or (path / UNET_FILE).is_file()):
        return _run_source(spec, path)
    if path.is_dir() and not (path / "config.json").is_file():
        raise RecareError(
            f"export source '{spec}' holds no weights: neither a run directory ({UNET_FILE}) nor a UNet folder",
            hint="pass the folder `recare erase` wrote, or a UNet weights file",
        )
    metadata = _safetensors_metadata(path) if path.suffix == FILE_SUFFIX else {}
    return ExportSource(
        spec=spec, unet_path=path, base_model=metadata.get("base_model") or None,
        method=metadata.get("method") or None, concepts=_split_concepts(metadata.get("concept", "")),
    )


def _run_source(spec: str, run_dir: Path) -> ExportSource:
    unet_path = run_dir / UNET_FILE
    if not unet_path.is_file():
        raise RecareError(
            f"run directory '{run_dir}' has no {UNET_FILE}: the run has not finished",
            hint="finish it with `recare erase` (a rerun continues), or export another run",
        )
    manifest = {}
    if (run_dir / MANIFEST).is_file():
        try:
            manifest = json.loads((run_dir / MANIFEST).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise RecareError(f"cannot read {run_dir / MANIFEST}: {exc}") from None
    metadata = _safetensors_metadata(unet_path)
    concepts = manifest.get("concepts") or _split_concepts(metadata.get("concept", ""))
    base_model = manifest.get("model")
    if isinstance(base_model, dict):  # `recare erase` records the resolved ModelRef; its spec is what was typed
        base_model = base_model.get("model")
    tokens_path = run_dir / TOKENS_FILE
    return ExportSource(
        spec=spec, unet_path=unet_path, run_dir=run_dir,
        tokens_path=tokens_path if tokens_path.is_file() else None,
        base_model=base_model or metadata.get("base_model") or None,
        method=manifest.get("method") or metadata.get("method") or None,
        concepts=[str(c) for c in concepts],
    )


def _split_concepts(text: str) -> list[str]:
    return [c.strip() for c in text.split(",") if c.strip()]


def _safetensors_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except Exception as exc:  # noqa: BLE001 - a corrupt or foreign file is a user error, whatever the cause
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise RecareError(f"'{path}' is not a readable safetensors file: {reason}") from None


def base_model_for(source: ExportSource, explicit_model: str | None, default_model: str) -> str:
    """--model when given on the command line, else the base the run recorded, else the default."""
    return explicit_model or source.base_model or default_model
