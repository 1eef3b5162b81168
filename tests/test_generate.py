"""`recare generate`: prompts in, reference-named images, manifest and run record out."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from recare_cli import generate as core
from recare_cli.errors import UsageError

TINY_ARGS = ("--model", "tiny-random", "--device", "cpu", "--height", "64", "--width", "64", "--steps", "2")


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


# prompts ---------------------------------------------------------------------------------------

def test_text_prompts_file_skips_blank_lines(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a cat\n\n  a dog on a sofa  \n")
    assert core.read_prompts(["a bird"], path) == [
        core.PromptRow("a bird"), core.PromptRow("a cat"), core.PromptRow("a dog on a sofa")
    ]


def test_csv_with_seed_and_case_number_columns(tmp_path):
    path = tmp_path / "coco.csv"
    # Written by a spreadsheet: a byte-order mark and a quoted prompt holding a comma.
    path.write_text('\ufeffcase_number,prompt,evaluation_seed\n7,"a cat, sleeping",1234\n8,a dog,\n', encoding="utf-8")
    assert core.read_prompts(None, path) == [
        core.PromptRow("a cat, sleeping", 1234, "7"), core.PromptRow("a dog", None, "8")
    ]


def test_csv_seed_column_named_seed(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("prompt,seed\na cat,5.0\n")
    assert core.read_prompts(None, path) == [core.PromptRow("a cat", 5)]


@pytest.mark.parametrize("content, message", [
    ("", "holds no prompts"),
    ("\n  \n", "holds no prompts"),
    ("text,seed\na cat,1\n", "has no 'prompt' column"),
    ("prompt,seed\na cat,one\n", "line 2: seed 'one' is not a number"),
    ("prompt,seed\na cat, sleeping,1\n", "line 2 has more cells than the header"),
])
def test_bad_prompts_files(tmp_path, content, message):
    path = tmp_path / ("p.csv" if "," in content else "p.txt")
    path.write_text(content)
    with pytest.raises(UsageError, match=message):
        core.read_prompts(None, path)


def test_no_prompt_at_all():
    with pytest.raises(UsageError, match="no prompt given"):
        core.read_prompts(None, None)
    with pytest.raises(UsageError, match="--prompt is empty"):
        core.read_prompts(["  "], None)


# planning --------------------------------------------------------------------------------------

def test_reference_file_names():
    assert core.image_filename("a photo of  a cat", 3) == "a_photo_of_a_cat_3.png"
    assert core.image_filename("any prompt", 0, case_number="17") == "17_0.png"
    assert core.image_filename("AC/DC poster", 1) == "AC-DC_poster_1.png"


def test_seeds_are_base_plus_index_and_csv_seeds_win():
    jobs = core.plan_jobs([core.PromptRow("a cat"), core.PromptRow("a dog", seed=100, case_number="4")], 2, seed=7)
    assert [(j.file, j.seed) for j in jobs] == [
        ("a_cat_0.png", 7), ("a_cat_1.png", 8), ("4_0.png", 100), ("4_1.png", 101)
    ]


def test_plan_rejects_zero_images_and_name_collisions():
    with pytest.raises(UsageError, match="at least 1"):
        core.plan_jobs([core.PromptRow("a cat")], 0, 42)
    with pytest.raises(UsageError, match="would both be named 'a_cat_0.png'"):
        core.plan_jobs([core.PromptRow("a cat"), core.PromptRow("a  cat", seed=1)], 1, 42)


# generating ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """Two prompts x two images, generated once through the CLI and shared by the tests below."""
    from typer.testing import CliRunner

    from recare_cli.cli import app

    out = tmp_path_factory.mktemp("gen") / "images"
    args = ["generate", "--prompt", "a cat", "--prompt", "a red bus", "--num-images", "2", "--seed", "10",
            "--guidance", "5", "--negative-prompt", "blurry", *TINY_ARGS, "--output-dir", str(out), "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.stderr
    return out, args, result


def test_files_manifest_and_run_record(first_run):
    out, _, result = first_run
    assert json.loads(result.stdout) == {"output_dir": str(out), "generated": 4, "skipped": 0, "total": 4}
    files = ["a_cat_0.png", "a_cat_1.png", "a_red_bus_0.png", "a_red_bus_1.png"]
    assert sorted(p.name for p in out.iterdir()) == sorted(files + ["manifest.jsonl", "recare-run.json"])
    assert all(Image.open(out / f).size == (64, 64) for f in files)

    lines = manifest(out)
    assert [(m["file"], m["prompt"], m["seed"]) for m in lines] == [
        ("a_cat_0.png", "a cat", 10), ("a_cat_1.png", "a cat", 11),
        ("a_red_bus_0.png", "a red bus", 10), ("a_red_bus_1.png", "a red bus", 11),
    ]
    assert {(m["steps"], m["guidance"], m["model"], m["unet"], m["negative_prompt"]) for m in lines} == {
        (2, 5.0, "tiny-random", None, "blurry")
    }

    record = json.loads((out / "recare-run.json").read_text())
    assert record["arguments"]["num_images"] == 2 and record["arguments"]["seed"] == 10
    assert record["arguments"]["guidance"] == 5.0
    assert record["versions"]["diffusers"] and record["versions"]["torch"]
    assert [p["prompt"] for p in record["prompts"]] == ["a cat", "a red bus"]
    # Written atomically: no temporary files left behind, and readable like any file the user writes.
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    assert (out / "a_cat_0.png").stat().st_mode & 0o044 == 0o044 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_images_differ_by_prompt_and_seed(first_run):
    out = first_run[0]
    cat0, cat1, bus0 = (pixels(out / f) for f in ("a_cat_0.png", "a_cat_1.png", "a_red_bus_0.png"))
    assert np.abs(cat0 - cat1).mean() > 1
    assert np.abs(cat0 - bus0).mean() > 0


def test_same_seed_and_settings_give_identical_images(first_run, tmp_path, run_cli):
    out, args, _ = first_run
    again = tmp_path / "again"
    result = run_cli(*[str(again) if a == str(out) else a for a in args])
    assert result.exit_code == 0, result.stderr
    for line in manifest(out):
        assert np.array_equal(pixels(again / line["file"]), pixels(out / line["file"])), line["file"]


def test_batching_keeps_each_image_seed(first_run, tmp_path, run_cli):
    out, args, _ = first_run
    batched = tmp_path / "batched"
    result = run_cli(*[str(batched) if a == str(out) else a for a in args], "--batch-size", "3")
    assert result.exit_code == 0, result.stderr
    for line in manifest(out):
        # Batched matmuls may round differently on a CPU; an image with another seed differs by far more.
        assert np.abs(pixels(batched / line["file"]) - pixels(out / line["file"])).max() <= 2, line["file"]


def test_rerun_skips_existing_images_and_regenerates_broken_ones(first_run, tmp_path, run_cli):
    out, args, _ = first_run
    rerun = tmp_path / "rerun"
    run_args = [str(rerun) if a == str(out) else a for a in args]
    assert run_cli(*run_args).exit_code == 0
    stamps = {p.name: p.stat().st_mtime_ns for p in rerun.glob("*.png")}

    result = run_cli(*run_args)
    assert json.loads(result.stdout) == {"output_dir": str(rerun), "generated": 0, "skipped": 4, "total": 4}
    assert {p.name: p.stat().st_mtime_ns for p in rerun.glob("*.png")} == stamps

    broken = rerun / "a_red_bus_1.png"
    broken.write_bytes(broken.read_bytes()[:100])  # an interrupted copy
    result = run_cli(*run_args)
    assert json.loads(result.stdout)["generated"] == 1
    assert np.array_equal(pixels(broken), pixels(out / "a_red_bus_1.png"))
    assert len(manifest(rerun)) == 4

    result = run_cli(*run_args, "--overwrite")
    assert json.loads(result.stdout)["generated"] == 4
    assert all(p.stat().st_mtime_ns != stamps[p.name] for p in rerun.glob("*.png"))


def test_rerun_with_more_images_keeps_the_manifest_complete(first_run, tmp_path, run_cli):
    out, args, _ = first_run
    grown = tmp_path / "grown"
    run_args = [str(grown) if a == str(out) else a for a in args]
    assert run_cli(*run_args).exit_code == 0
    more = [("3" if a == "2" and run_args[i - 1] == "--num-images" else a) for i, a in enumerate(run_args)]
    result = run_cli(*more)
    assert json.loads(result.stdout) == {"output_dir": str(grown), "generated": 2, "skipped": 4, "total": 6}
    assert sorted(m["file"] for m in manifest(grown)) == sorted(
        f"{stem}_{i}.png" for stem in ("a_cat", "a_red_bus") for i in range(3)
    )


def test_csv_prompts_use_case_numbers_and_their_seeds(tmp_path, run_cli):
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("case_number,prompt,evaluation_seed\n12,a cat,99\n")
    out = tmp_path / "images"
    result = run_cli("generate", "--prompts-file", prompts, *TINY_ARGS, "--output-dir", out, "--quiet")
    assert result.exit_code == 0, result.stderr
    assert [(m["file"], m["seed"], m["case_number"]) for m in manifest(out)] == [("12_0.png", 99, "12")]


# bad input: one-line error, non-zero exit, nothing written -------------------------------------

@pytest.fixture
def prompt_files(tmp_path) -> dict[str, Path]:
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "noprompt.csv").write_text("text,seed\na cat,1\n")
    (tmp_path / "a-file").write_text("")
    (tmp_path / "not-a-model").mkdir()
    return {p.name: p for p in tmp_path.iterdir()}


@pytest.mark.parametrize("args, code, message", [
    ([], 2, "no prompt given"),
    (["--prompts-file", "{empty.txt}"], 2, "holds no prompts"),
    (["--prompts-file", "{noprompt.csv}"], 2, "has no 'prompt' column"),
    (["--prompt", "a cat", "--num-images", "0"], 2, "--num-images must be at least 1"),
    (["--prompt", "a cat", "--scheduler", "fast"], 2, "unknown scheduler 'fast'"),
    (["--prompt", "a cat", "--model", "{not-a-model}"], 1, "is not a diffusers pipeline folder"),
    (["--prompt", "a cat", "--batch-size", "0"], 2, "--batch-size must be at least 1"),
    (["--prompt", "a cat", "--device", "tpu"], 2, "is not a device"),
], ids=["no-prompt", "empty-file", "csv-no-prompt-column", "zero-images", "unknown-scheduler",
        "not-a-model", "zero-batch", "bad-device"])
def test_bad_input(tmp_path, prompt_files, run_cli, args, code, message):
    out = tmp_path / "images"
    args = [str(prompt_files[a[1:-1]]) if a.startswith("{") else a for a in args]
    result = run_cli("generate", *TINY_ARGS, *args, "--output-dir", out)
    assert result.exit_code == code
    assert result.stderr.startswith("Error: ") and message in result.stderr
    assert len(result.stderr.splitlines()) == 1
    assert result.stdout == ""
    assert not out.exists()


def test_unwritable_output_dir(prompt_files, run_cli):
    out = prompt_files["a-file"] / "images"  # below a regular file: no one can create it
    result = run_cli("generate", "--prompt", "a cat", *TINY_ARGS, "--output-dir", out)
    assert result.exit_code == 2  # a usage error: the path names a file as a folder
    assert result.stderr.startswith(f"Error: cannot write to --output-dir '{out}'")
    assert len(result.stderr.splitlines()) == 1


def test_failed_run_keeps_an_existing_output_dir(tmp_path, run_cli):
    out = tmp_path / "images"
    out.mkdir()
    result = run_cli("generate", "--prompt", "a cat", *TINY_ARGS, "--unet", tmp_path / "none.pt", "--output-dir", out)
    assert result.exit_code == 2
    assert out.is_dir() and not list(out.iterdir())


# several processes -----------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_accelerate_launch_two_processes_matches_one(first_run, tmp_path):
    out, args, _ = first_run
    split = tmp_path / "split"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()),
        "-m", "recare_cli", *[str(split) if a == str(out) else a for a in args],
    ]
    # No GPU on purpose: two CPU processes talking over gloo, as on a CI machine. OMP_NUM_THREADS
    # stays as in this process: a CPU's float rounding depends on how many threads split a matmul.
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    # One summary, from the main process, counting the images of both.
    assert [json.loads(line) for line in done.stdout.splitlines()] == [
        {"output_dir": str(split), "generated": 4, "skipped": 0, "total": 4}
    ]
    assert manifest(split) == manifest(out)
    for line in manifest(out):
        assert np.array_equal(pixels(split / line["file"]), pixels(out / line["file"])), line["file"]
