"""What an export is asked for (format, output, dtype, rank), refused early when it cannot be done, and what it reports."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from recare_cli.errors import UsageError
from recare_cli.export.check import TOLERANCE
from recare_cli.fsutil import ensure_writable_dir
from recare_cli.manifest import Writer, claim
from recare_cli.numbers import check

FORMATS = ("diffusers", "unet", "single-file", "lora", "tokens")
FILE_SUFFIX = ".safetensors"
EXPORT = Writer("export")
DEFAULT_RANK = 32


@dataclass
class ExportSettings:
    format: str
    output: Path
    dtype: str = "fp32"  # fp32 | fp16 | bf16: the precision the export stores
    rank: int = DEFAULT_RANK
    overwrite: bool = False
    safety_checker: bool = True  # a diffusers export keeps the base pipeline's safety checker


@dataclass
class ExportResult:
    format: str
    output: str
    base_model: str
    dtype: str
    max_abs_diff: float  # what the check compared (see `checked_against`)
    tolerance: float
    checked_against: str
    files: list[str] = field(default_factory=list)
    details: dict = field(default_factory=dict)


def check_settings(settings: ExportSettings) -> None:
    """Everything about the output that can be refused before any model is loaded."""
    if settings.format not in FORMATS:
        raise UsageError(f"unknown export format '{settings.format}'", hint=f"choose one of {', '.join(FORMATS)}")
    if settings.dtype not in TOLERANCE:
        raise UsageError(f"cannot export in '{settings.dtype}'", hint="use --dtype fp32, fp16 or bf16")
    check("rank", settings.rank)
    output = Path(settings.output)
    wants_file = output.suffix == FILE_SUFFIX
    if settings.format == "diffusers" and wants_file:
        raise UsageError(f"--format diffusers writes a folder, not '{output}'", hint="drop the .safetensors suffix")
    if settings.format in ("unet", "single-file", "lora") and not wants_file:
        raise UsageError(f"--format {settings.format} writes one file: --output must end in {FILE_SUFFIX}")
    if output.is_dir():
        claim(output, EXPORT, flag="--output")  # --overwrite must not replace another command's folder
    elif output.exists():
        claim(output.parent, EXPORT, flag="--output")
    if output.exists() or output.is_symlink():
        if not settings.overwrite:
            raise UsageError(f"'{output}' already exists",
                             hint="pass --overwrite to replace it, or choose another --output")
        if output.is_dir() == wants_file:
            kind = "folder" if output.is_dir() else "file"
            raise UsageError(f"'{output}' is a {kind}; this export would replace it with a "
                             f"{'file' if wants_file else 'folder'}", hint="choose another --output")
    ensure_writable_dir(output.parent, "--output")
