"""The export: refuse early, write into a staging path, check it loads back, then publish it."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Iterator

from recare_cli.errors import RecareError
from recare_cli.export.check import CHECK_FAILED_HINT, TOLERANCE
from recare_cli.export.diffusers_folder import _export_diffusers
from recare_cli.export.lora import _export_lora
from recare_cli.export.settings import ExportResult, ExportSettings, check_settings
from recare_cli.export.single_file import _export_single_file
from recare_cli.export.source import ExportSource
from recare_cli.export.tokens import _export_tokens
from recare_cli.export.unet import _export_unet
from recare_cli.fsutil import give_umask_mode, removing_new_dirs
from recare_cli.models import TOKENS_FILE, Runtime, read_unet_state_dict
from recare_cli.output import QUIET_REPORTER, Reporter


@contextmanager
def staged_output(output: Path) -> Iterator[Path]:
    """A path with the output's own name in a private folder next to it; it replaces `output` on success.

    Loaders tell a checkpoint's format from its file name, so the staged copy keeps the real name
    (fsutil.atomic_path's temporary names end in .tmp) and can be loaded back before it is moved.
    """
    output = Path(output)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent))
    try:
        staged = staging / output.name
        yield staged
        give_umask_mode(staged)
        if output.is_dir() and not output.is_symlink():
            shutil.rmtree(output)
        os.replace(staged, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# the export ---------------------------------------------------------------------------------

def export(source: ExportSource, settings: ExportSettings, runtime: Runtime,
           reporter: Reporter = QUIET_REPORTER) -> ExportResult:
    """Write `source` in `settings.format`, check it loads back to the same model, then publish it."""
    with removing_new_dirs(Path(settings.output).parent):
        check_settings(settings)
        if settings.format == "tokens" and source.tokens_path is None:
            raise RecareError(
                f"export source '{source.spec}' has no learned tokens ({TOKENS_FILE})"
                + (f"; method '{source.method}' learns none" if source.method else ""),
                hint="tokens come from a ReCARE run directory; export the UNet with --format unet, lora, ...",
            )
        if settings.format != "tokens":  # unreadable or exploded weights fail before the base model loads
            source = replace(source, unet_state=read_unet_state_dict(source.unet_path))
        reporter.event("export_load", base_model=runtime.model, source=source.spec)
        pipe, ref, _ = runtime.pipeline()
        writer = {"diffusers": _export_diffusers, "unet": _export_unet, "single-file": _export_single_file,
                  "lora": _export_lora, "tokens": _export_tokens}[settings.format]
        with staged_output(Path(settings.output)) as staged:
            result = writer(pipe, ref, source, settings, staged, reporter)
            tolerance = TOLERANCE[settings.dtype]
            reporter.event("export_check", max_abs_diff=result.max_abs_diff, tolerance=tolerance,
                           against=result.checked_against)
            if not result.max_abs_diff <= tolerance:  # written so that NaN fails too
                raise RecareError(
                    f"export check failed: the {settings.format} export differs from {result.checked_against} "
                    f"by {result.max_abs_diff:.3g} (tolerance {tolerance:g} for {settings.dtype}); nothing was written",
                    hint=CHECK_FAILED_HINT,
                )
        result.output = str(settings.output)
        result.files = [str(Path(settings.output) / name) for name in result.files] or [str(settings.output)]
        return result
