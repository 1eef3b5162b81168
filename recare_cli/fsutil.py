"""Files: atomic writes (every output goes to a temporary sibling, then is renamed into place) and image folders."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import warnings
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterator

from recare_cli.errors import RecareError, UsageError

# The CARE set reads these (recare-method.md §6.2); eval also takes .webp.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def give_umask_mode(path: str | os.PathLike) -> None:
    """Give `path` (and a folder's contents) the mode a file the user writes gets.

    Temporary files and folders are private (0600/0700), and writers that recreate a file
    (safetensors' save_file) make it private too; outputs must not stay that way.
    """
    path = Path(path)
    mask = _umask()
    targets = [path, *path.rglob("*")] if path.is_dir() and not path.is_symlink() else [path]
    for target in targets:
        if target.is_symlink():
            continue
        target.chmod((0o777 if target.is_dir() else 0o666) & ~mask)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success rename it over `path`, else delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    # mkstemp makes the file private (0600); the renamed result must look like any file the user writes.
    os.fchmod(fd, 0o666 & ~_umask())
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        if tmp.is_file():
            give_umask_mode(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def json_text(data, *, indent: int | None = None, undefined_as_null: bool = False) -> str:
    """The one JSON encoder for everything recare writes: never bare NaN/Infinity (invalid JSON).

    `undefined_as_null` is for measurements (a loss, a metric) that can legitimately be undefined:
    they become null. Anywhere else a non-finite number is a bug upstream and raises RecareError.
    """
    if undefined_as_null:
        data = _finite_or_null(data)
    try:
        return json.dumps(data, indent=indent, default=str, allow_nan=False)
    except ValueError as exc:
        raise RecareError(f"refusing to write a non-finite number (NaN or infinity) as JSON: {exc}",
                          hint="this is a bug in recare or a plugin; please report it") from None


def _finite_or_null(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(v) for v in value]
    return value


def write_json(path: str | os.PathLike, data, *, undefined_as_null: bool = False) -> None:
    write_text(path, json_text(data, indent=2, undefined_as_null=undefined_as_null) + "\n")


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder next to `path`; on success it replaces `path` as a whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        give_umask_mode(tmp)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def removing_new_dirs(path: str | os.PathLike) -> Iterator[None]:
    """On failure, remove the folders of `path` (it and its parents) that this block created, while empty.

    A failed first run leaves no empty output folder behind; a folder that existed before is never touched.
    """
    missing, folder = [], Path(path).absolute()
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    try:
        yield
    except BaseException:
        for folder in missing:  # deepest first
            with suppress(OSError):
                folder.rmdir()
        raise


def ensure_writable_dir(path: str | os.PathLike, flag: str = "--output-dir") -> Path:
    """Create `path` if needed and prove we can write there, before any expensive work starts.

    `flag` is the option the folder came from (--output-dir, export's --output…): the message and
    its hint name the flag the command actually has.
    """
    path = Path(path)
    blocker = file_in_the_way(path)
    if blocker is not None:
        raise UsageError(f"cannot write to {flag} '{path}': '{blocker}' is a file, not a folder",
                         hint=f"choose another {flag}")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=path, prefix=".recare-probe-", delete=True)
        probe.close()
    except OSError as exc:
        raise RecareError(
            f"cannot write to {flag} '{path}': {exc.strerror or exc}",
            hint=f"choose another {flag} or fix its permissions",
        ) from None
    return path


def image_problem(path: str | os.PathLike) -> str | None:
    """Why the image at `path` cannot be used (unreadable, truncated, a decompression bomb), or None.

    The header gives the size before any pixel is decoded, so a PNG claiming 100000×100000 costs
    nothing; everything else is decoded in full, because a truncated file passes a header check.
    """
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as image:
                if image.width * image.height > Image.MAX_IMAGE_PIXELS:
                    return f"{image.width}×{image.height} pixels is more than the {Image.MAX_IMAGE_PIXELS:,} allowed"
                image.load()
        except Image.DecompressionBombError:
            return f"more than the {Image.MAX_IMAGE_PIXELS:,} pixels allowed"
        except (OSError, ValueError, SyntaxError, EOFError) as exc:
            return " ".join(str(exc).split()) or type(exc).__name__
    return None


@dataclass(frozen=True)
class ImageScan:
    folder: Path
    flag: str
    images: tuple[Path, ...]  # usable, in sorted name order
    skipped: tuple[tuple[Path, str], ...]  # (file, why) for every unusable one

    def warning(self) -> str:
        first, why = self.skipped[0]
        total = len(self.images) + len(self.skipped)
        return (f"{self.flag} '{self.folder}': skipped {len(self.skipped)} of {total} images that could not be "
                f"read (e.g. {first.name}: {why})")


def scan_images(folder: str | os.PathLike, flag: str = "--images",
                suffixes: tuple[str, ...] = IMAGE_SUFFIXES) -> ImageScan:
    """Every image directly inside `folder` (by suffix), each checked; a UsageError naming `flag` if none is usable."""
    folder = Path(folder)
    if not folder.exists():
        raise UsageError(f"{flag} '{folder}' does not exist", hint="pass a folder of images")
    if not folder.is_dir():
        raise UsageError(f"{flag} '{folder}' is not a folder", hint="pass a folder of images")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in suffixes)
    if not files:
        raise UsageError(f"{flag} '{folder}' holds no images (looked for {', '.join(suffixes)})",
                         hint="generate some with `recare generate --prompt 'A photo of ...' --output-dir DIR`")
    stamp = tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    scan = _scan(folder, flag, tuple(files), stamp)
    if not scan.images:
        raise UsageError(f"none of the {len(files)} images in {flag} '{folder}' can be read "
                         f"(e.g. {scan.skipped[0][0].name}: {scan.skipped[0][1]})",
                         hint="pass a folder of valid png/jpg images")
    return scan


@lru_cache(maxsize=16)
def _scan(folder: Path, flag: str, files: tuple[Path, ...], stamp: tuple) -> ImageScan:
    # `stamp` (names, sizes, mtimes) is part of the key: an edited folder is checked again.
    problems = [(path, image_problem(path)) for path in files]
    return ImageScan(folder, flag, tuple(p for p, why in problems if why is None),
                     tuple((p, why) for p, why in problems if why is not None))


_WARNED: set[ImageScan] = set()


def file_in_the_way(folder: str | os.PathLike) -> Path | None:
    """The existing non-folder (`folder` itself or a parent) that stops `folder` from being a folder, if any."""
    folder = Path(folder).expanduser()
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    return existing if existing is not None and not existing.is_dir() else None


def list_images(folder: str | os.PathLike, flag: str = "--images", suffixes: tuple[str, ...] = IMAGE_SUFFIXES,
                warn: Callable[[str], None] | None = None) -> list[Path]:
    """The usable images of an image folder; every command that reads one reads it through here.

    Unusable files (unreadable, truncated, decompression bombs) are skipped with one warning per
    folder, found before any work starts; a folder with no usable image is a UsageError.
    """
    scan = scan_images(folder, flag, suffixes)
    if scan.skipped and scan not in _WARNED:
        _WARNED.add(scan)
        if warn is None:
            from recare_cli.output import Reporter

            warn = Reporter().warn
        warn(scan.warning())
    return list(scan.images)


def write_safetensors(path: str | os.PathLike, tensors: dict, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def read_safetensors(path: str | os.PathLike) -> tuple[dict, dict]:
    """(name -> tensor, metadata) of a safetensors file."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}, handle.metadata() or {}
