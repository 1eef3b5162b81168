"""recare's own cache: built-in models, CLIP vocabulary embeddings, erased models by name.

Layout under the cache root (platformdirs user cache dir, RECARE_CACHE_DIR or --cache-dir):
    models/<name>/          built-in pipelines written once (diffusers layout)
    clip/<key>/             built-in CLIP weights and vocabulary embeddings
    erased/<name>/          erased models registered by `recare erase`
    .locks/                 one lock file per entry being written

Several processes may share the cache (two shell jobs, `accelerate launch`): every entry is
written beside its place and renamed into it, under that entry's cross-process lock, and a
built entry is used only when its stamp's file digests match what is on disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from recare_cli.errors import UsageError

SECTIONS = ("models", "clip", "erased")
STAMP = "recare-builtin.json"  # written last into a built entry: what it was built from, and its files' digests


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    if cache_dir:
        return check_cache_dir(cache_dir)
    if os.environ.get("RECARE_CACHE_DIR"):
        return check_cache_dir(os.environ["RECARE_CACHE_DIR"])
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("recare"))


def check_cache_dir(cache_dir: str | os.PathLike | None) -> Path | None:
    """The cache folder as a Path; a UsageError if something other than a folder is in its way."""
    if cache_dir is None:
        return None
    from recare_cli.fsutil import file_in_the_way

    path = Path(cache_dir).expanduser()
    blocker = file_in_the_way(path)
    if blocker is not None:
        raise UsageError(f"--cache-dir '{path}' is not a folder ('{blocker}' is a file)",
                         hint="point --cache-dir (or RECARE_CACHE_DIR) at a folder")
    return path


@dataclass
class CacheEntry:
    section: str
    name: str
    path: Path
    size_bytes: int


def dir_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def list_entries(root: Path) -> list[CacheEntry]:
    entries = []
    for section in SECTIONS:
        folder = root / section
        if not folder.is_dir():
            continue
        for child in sorted(folder.iterdir()):
            if child.name.startswith("."):
                continue
            entries.append(CacheEntry(section, child.name, child, dir_size(child)))
    return entries


def clear(root: Path, section: str | None = None, name: str | None = None) -> list[CacheEntry]:
    """Delete cache entries (all, one section, or one entry); return what was removed."""
    if section is not None and section not in SECTIONS:
        raise UsageError(f"unknown cache section '{section}'", hint=f"choose one of {', '.join(SECTIONS)}")
    removed = [
        e for e in list_entries(root)
        if (section is None or e.section == section) and (name is None or e.name == name)
    ]
    if name is not None and not removed:
        raise UsageError(f"nothing named '{name}' in the cache at {root}", hint="see `recare cache`")
    for entry in removed:
        shutil.rmtree(entry.path) if entry.path.is_dir() else entry.path.unlink()
    return removed


@contextmanager
def locked(root: Path, section: str, name: str) -> Iterator[None]:
    """Hold the cross-process lock of the entry `section/name` (others wait for it)."""
    from filelock import FileLock

    locks = Path(root) / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    with FileLock(str(locks / f"{section}-{name}.lock")):
        yield


def _file_digests(folder: Path) -> dict[str, str]:
    digests = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != STAMP):
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        digests[path.relative_to(folder).as_posix()] = digest.hexdigest()
    return digests


def entry_complete(folder: Path, source_digest: str) -> bool:
    """Whether a built entry is whole: its stamp names `source_digest` and every file's digest matches."""
    try:
        stamp = json.loads((folder / STAMP).read_text(encoding="utf-8"))
        return stamp.get("config_sha256") == source_digest and stamp.get("files") == _file_digests(folder)
    except (OSError, ValueError, AttributeError):
        return False


def built_entry(root: Path, section: str, name: str, source_digest: str, build: Callable[[Path], None]) -> Path:
    """The cache folder `section/name`, built from `source_digest`'s sources (once, by one process) when not whole."""
    from recare_cli.fsutil import atomic_dir, write_json

    folder = Path(root) / section / name
    if entry_complete(folder, source_digest):
        return folder
    with locked(root, section, name):
        if entry_complete(folder, source_digest):  # built by another process while this one waited
            return folder
        with atomic_dir(folder) as tmp:
            build(tmp)
            write_json(tmp / STAMP, {"name": name, "config_sha256": source_digest, "files": _file_digests(tmp)})
    return folder


def erased_dir(root: Path, name: str) -> Path:
    return root / "erased" / name


def register_erased(root: Path, name: str, run_dir: Path, info: dict) -> Path:
    """Record an erased model under `name`: a pointer to its run directory plus a summary."""
    from recare_cli.fsutil import write_json

    target = erased_dir(root, name)
    with locked(root, "erased", name):
        target.mkdir(parents=True, exist_ok=True)
        write_json(target / "entry.json", {"name": name, "run_dir": str(Path(run_dir).resolve()), **info})
    return target


def lookup_erased(root: Path, name: str) -> Path | None:
    """The run directory of a registered erased model, or None if `name` is not registered."""
    entry = erased_dir(root, name) / "entry.json"
    if not entry.is_file():
        return None
    run_dir = Path(json.loads(entry.read_text())["run_dir"])
    return run_dir if run_dir.exists() else None
