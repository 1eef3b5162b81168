"""Files: atomic writes (every output goes to a temporary sibling, then is renamed into place) and image folders."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Iterator

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


def write_json(path: str | os.PathLike, data) -> None:
    write_text(path, json.dumps(data, indent=2, default=str) + "\n")


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


def ensure_writable_dir(path: str | os.PathLike, what: str = "output directory") -> Path:
    """Create `path` if needed and prove we can write there, before any expensive work starts."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=path, prefix=".recare-probe-", delete=True)
        probe.close()
    except OSError as exc:
        raise RecareError(
            f"cannot write to {what} '{path}': {exc.strerror or exc}",
            hint="choose another --output-dir or fix its permissions",
        ) from None
    return path


def list_images(folder: str | os.PathLike, flag: str = "--images", suffixes: tuple[str, ...] = IMAGE_SUFFIXES) -> list[Path]:
    """The images directly inside `folder` (by suffix), in sorted name order; a UsageError naming `flag` if none."""
    folder = Path(folder)
    if not folder.exists():
        raise UsageError(f"{flag} '{folder}' does not exist", hint="pass a folder of images")
    if not folder.is_dir():
        raise UsageError(f"{flag} '{folder}' is not a folder", hint="pass a folder of images")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in suffixes)
    if not files:
        raise UsageError(f"{flag} '{folder}' holds no images (looked for {', '.join(suffixes)})",
                         hint="generate some with `recare generate --prompt 'A photo of ...' --output-dir DIR`")
    return files


def write_safetensors(path: str | os.PathLike, tensors: dict, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def read_safetensors(path: str | os.PathLike) -> tuple[dict, dict]:
    """(name -> tensor, metadata) of a safetensors file."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}, handle.metadata() or {}
