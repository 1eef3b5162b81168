"""recare's own cache: built-in models, CLIP vocabulary embeddings, erased models by name.

Layout under the cache root (platformdirs user cache dir, RECARE_CACHE_DIR or --cache-dir):
    models/<name>/          built-in pipelines written once (diffusers layout)
    clip/<key>/             built-in CLIP weights and vocabulary embeddings
    erased/<name>/          erased models registered by `recare erase`
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from recare_cli.errors import UsageError

SECTIONS = ("models", "clip", "erased")


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


def erased_dir(root: Path, name: str) -> Path:
    return root / "erased" / name


def register_erased(root: Path, name: str, run_dir: Path, info: dict) -> Path:
    """Record an erased model under `name`: a pointer to its run directory plus a summary."""
    from recare_cli.fsutil import write_json

    target = erased_dir(root, name)
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
