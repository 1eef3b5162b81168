"""recare_cli/fsutil.py: a write interrupted at any point leaves the old file (or nothing), never half a file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from recare_cli.errors import RecareError, UsageError
from recare_cli.fsutil import atomic_dir, atomic_path, ensure_writable_dir, list_images, write_json, write_text


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("interrupt", [OSError("disk full"), KeyboardInterrupt()])
def test_atomic_path_interrupted_mid_write_keeps_the_old_file(tmp_path, interrupt):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(type(interrupt)):
        with atomic_path(target) as tmp:
            assert tmp.parent == tmp_path and tmp.name.startswith(".out.bin.") and tmp.name.endswith(".tmp")
            with open(tmp, "wb") as handle:
                handle.write(b"half of the new")
                raise interrupt
    assert target.read_bytes() == b"old"
    assert _leftovers(tmp_path) == []


def test_atomic_path_replaces_on_success_with_the_users_file_mode(tmp_path):
    target = tmp_path / "sub" / "out.txt"  # a missing parent is created
    old_mask = os.umask(0o027)
    try:
        with atomic_path(target) as tmp:
            tmp.write_text("new")
    finally:
        os.umask(old_mask)
    assert target.read_text() == "new"
    assert target.stat().st_mode & 0o777 == 0o640  # 0o666 under umask 027, not mkstemp's 0o600
    assert _leftovers(target.parent) == []


def test_write_json_interrupted_mid_write_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "recare-run.json"
    write_json(target, {"status": "complete"})
    real_write = Path.write_text

    def torn(self, text, *args, **kwargs):
        real_write(self, text[: len(text) // 2], *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", torn)
    with pytest.raises(KeyboardInterrupt):
        write_json(target, {"status": "running", "stages": list(range(100))})
    monkeypatch.undo()
    assert json.loads(target.read_text()) == {"status": "complete"}
    assert _leftovers(tmp_path) == []


def test_write_text_and_json_write_what_they_are_given(tmp_path):
    write_text(tmp_path / "a.txt", "héllo\n")
    assert (tmp_path / "a.txt").read_bytes() == "héllo\n".encode()
    write_json(tmp_path / "b.json", {"path": tmp_path, "n": 1})  # non-JSON values as their str()
    assert json.loads((tmp_path / "b.json").read_text()) == {"path": str(tmp_path), "n": 1}
    # Manifests are read by people too: one key a line, indented by two, ending in a newline.
    assert (tmp_path / "b.json").read_text() == f'{{\n  "path": "{tmp_path}",\n  "n": 1\n}}\n'


KILLED_WRITER = """
import sys, time
from recare_cli.fsutil import atomic_path
with atomic_path(sys.argv[1]) as tmp:
    with open(tmp, "wb") as handle:
        for _ in range(1000):
            handle.write(b"x" * 4096)
            handle.flush()
            time.sleep(0.01)
"""


def test_a_writer_killed_mid_write_leaves_the_old_file(tmp_path):
    target = tmp_path / "unet.safetensors"
    target.write_bytes(b"old weights")
    writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(target)])
    try:
        deadline = time.monotonic() + 60
        while not any(p.stat().st_size > 0 for p in tmp_path.glob(".unet.safetensors.*.tmp")):
            assert time.monotonic() < deadline and writer.poll() is None, "the writer never started writing"
            time.sleep(0.02)
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    assert target.read_bytes() == b"old weights"


@pytest.mark.parametrize("interrupt", [OSError("disk full"), KeyboardInterrupt()])
def test_atomic_dir_interrupted_keeps_the_old_folder(tmp_path, interrupt):
    target = tmp_path / "model"
    target.mkdir()
    (target / "config.json").write_text("old")
    with pytest.raises(type(interrupt)):
        with atomic_dir(target) as tmp:
            assert tmp.parent == tmp_path and tmp.name.startswith(".model.") and tmp.name.endswith(".tmp")
            (tmp / "config.json").write_text("new")
            raise interrupt
    assert [p.name for p in target.iterdir()] == ["config.json"] and (target / "config.json").read_text() == "old"
    assert _leftovers(tmp_path) == []


def test_atomic_dir_replaces_the_whole_folder(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "stale.bin").write_text("old")
    old_mask = os.umask(0o022)
    try:
        with atomic_dir(target) as tmp:
            (tmp / "config.json").write_text("new")
        with atomic_dir(tmp_path / "fresh") as tmp:  # no folder there before
            (tmp / "a").write_text("a")
    finally:
        os.umask(old_mask)
    assert sorted(p.name for p in target.iterdir()) == ["config.json"]
    assert target.stat().st_mode & 0o777 == 0o755  # not mkdtemp's 0o700
    assert (tmp_path / "fresh" / "a").read_text() == "a"
    assert _leftovers(tmp_path) == []


def test_ensure_writable_dir_creates_the_folder_and_leaves_no_probe(tmp_path):
    folder = tmp_path / "a" / "b"
    assert ensure_writable_dir(folder) == folder and folder.is_dir()
    assert list(folder.iterdir()) == []
    (folder / "kept").write_text("")
    assert ensure_writable_dir(folder) == folder  # an existing folder is fine, and kept as it is
    assert [p.name for p in folder.iterdir()] == ["kept"]


def test_ensure_writable_dir_refuses_a_path_under_a_file(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(UsageError) as caught:
        ensure_writable_dir(tmp_path / "file" / "out", "--output")
    # The file in the way is named, and the hint names the flag the command has.
    assert caught.value.message == (f"cannot write to --output '{tmp_path / 'file' / 'out'}': "
                                    f"'{tmp_path / 'file'}' is a file, not a folder")
    assert caught.value.hint == "choose another --output"
    with pytest.raises(UsageError) as caught:
        ensure_writable_dir(tmp_path / "file")
    assert caught.value.message.startswith(f"cannot write to --output-dir '{tmp_path / 'file'}': ")
    assert not (tmp_path / "file" / "out").exists()


def test_list_images_sorted_by_name_and_filtered_by_suffix(tmp_path):
    from PIL import Image

    for name, fmt in (("b.PNG", "PNG"), ("a.jpg", "JPEG"), ("c.jpeg", "JPEG"), ("d.webp", "WEBP")):
        Image.new("RGB", (8, 8)).save(tmp_path / name, format=fmt)
    (tmp_path / "notes.txt").write_text("")
    (tmp_path / "e.png").mkdir()  # a folder is not an image
    assert [p.name for p in list_images(tmp_path)] == ["a.jpg", "b.PNG", "c.jpeg"]
    assert [p.name for p in list_images(tmp_path, suffixes=(".webp",))] == ["d.webp"]


@pytest.mark.parametrize("case,problem", [("missing", "does not exist"), ("file", "is not a folder"),
                                          ("empty", "holds no images")])
def test_list_images_refuses_what_is_not_an_image_folder(tmp_path, case, problem):
    path = tmp_path / case
    if case == "file":
        path.write_text("")
    elif case == "empty":
        path.mkdir()
        (path / "notes.txt").write_text("")
    with pytest.raises(UsageError) as caught:
        list_images(path, flag="--reference-dir")
    assert caught.value.message.startswith(f"--reference-dir '{path}' {problem}")
    assert caught.value.hint.startswith(HINTS[case][0]) and HINTS[case][1] in caught.value.hint
    with pytest.raises(UsageError) as caught:
        list_images(path)
    assert caught.value.message.startswith(f"--images '{path}' {problem}")  # the flag erase and careset take


HINTS = {"missing": ("pass a folder of images", "images"), "file": ("pass a folder of images", "images"),
         "empty": ("generate some with `recare generate", "--output-dir DIR")}
