"""`recare erase --recipe`: parsing and checks, a two-entry run on tiny-random, failures, and a shell loop."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from noise_images import noise_images

BIN_DIR = Path(sys.executable).parent  # where the venv's `recare` script lives
TINY = ["--resolution", "64", "--iterations", "1", "--prefix-steps", "1", "--checkpoint-every", "1"]


@pytest.fixture(scope="module")
def images(tmp_path_factory, tiny_model) -> Path:
    return noise_images(tmp_path_factory.mktemp("recipe-inputs") / "images", 2, (40, 48))


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def recipe_text(images: Path, runs: Path | str = "runs", first_images: Path | None = None) -> str:
    """Two tiny esd runs; the second overrides iterations and the type."""
    own_images = f'images = "{first_images}"' if first_images else ""
    return f"""
model = "tiny-random"
method = "esd"
resolution = 64
iterations = 1
prefix_steps = 1
checkpoint-every = 1
images = "{images}"

[[concept]]
concept = "nudity"
output-dir = "{runs}/nudity"
{own_images}

[[concept]]
concept = "tench"
type = "object"
iterations = 2
output-dir = "{runs}/tench"
"""


def json_lines(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines()]


# parsing and precedence (no model loaded) -----------------------------------------------------

def test_entry_beats_command_line_beats_top_level_and_paths_follow_the_recipe(tmp_path, images):
    from recare_cli.erase.recipe import plan_entries, read_recipe
    from recare_cli.erase.run import EraseRequest
    from recare_cli.models import Runtime

    recipe = read_recipe(write(tmp_path / "r.toml", recipe_text(images) + 'seed = 3\ndevice = "cpu"\n'))
    base = EraseRequest(concepts=[], iterations=200, seed=9, resolution=512, num_images=7)
    typed = {"iterations", "num_images"}  # as if `--iterations 200 --num-images 7` were typed
    first, second = plan_entries(recipe, base, Runtime(model="other", device="auto"), typed)

    assert first.request.concepts == ["nudity"] and second.request.concepts == ["tench"]
    assert (first.request.iterations, second.request.iterations) == (200, 2)  # typed > top level; entry > typed
    assert (first.request.resolution, first.request.prefix_steps, first.request.checkpoint_every) == (64, 1, 1)
    assert first.request.num_images == 7 and first.request.method == "esd"
    assert (first.request.seed, second.request.seed) == (9, 3)  # seed was not typed, so only tench sets it
    assert (second.request.concept_type, first.request.concept_type) == ("object", None)
    assert first.runtime.model == "tiny-random" and second.runtime.device == "cpu" and first.runtime.device == "auto"
    assert first.request.output_dir == tmp_path / "runs/nudity" and first.request.images == images


def test_a_name_list_is_one_run(tmp_path):
    from recare_cli.erase.recipe import parse_recipe

    recipe = parse_recipe({"concept": [{"concept": ["tench", "church"], "type": "object"}]}, tmp_path / "r.toml")
    assert recipe.entries == [{"concepts": ["tench", "church"], "concept_type": "object"}]


def test_erase_from_is_a_name_or_a_list_of_names(tmp_path):
    from recare_cli.erase.recipe import parse_recipe
    from recare_cli.errors import UsageError

    recipe = parse_recipe({"erase-from": "painting",
                           "concept": [{"concept": "Van Gogh"}, {"concept": ["a", "b"], "erase_from": ["x", "y"]}]},
                          tmp_path / "r.toml")
    assert recipe.defaults == {"erase_from": ["painting"]}
    assert recipe.entries[1]["erase_from"] == ["x", "y"]
    with pytest.raises(UsageError, match="'erase-from' must be a name or a list of names"):
        parse_recipe({"concept": [{"concept": "a", "erase-from": 3}]}, tmp_path / "r.toml")


# bad recipes: one line, exit 2, nothing run -----------------------------------------------------

BAD = {
    "unknown-entry-key": ('[[concept]]\nconcept = "nudity"\n[[concept]]\nconcept = "tench"\niteration = 3\n',
                          "[[concept]] #2: unknown key 'iteration'", "did you mean 'iterations'?"),
    "unknown-top-key": ('concepts = ["nudity"]\n[[concept]]\nconcept = "nudity"\n',
                        "unknown key 'concepts'", "allowed: apg-eta"),
    "missing-concept": ('[[concept]]\nconcept = "nudity"\n[[concept]]\ntype = "object"\n',
                        "[[concept]] #2 has no 'concept'", 'concept = "NAME"'),
    "no-tables": ('concept = "nudity"\n', "has no [[concept]] tables", "[[concept]] table per run"),
    "bad-toml": ('[[concept]]\nconcept = "nudity\n', "is not valid TOML", "[[concept]] table per run"),
    "wrong-type": ('iterations = "ten"\n[[concept]]\nconcept = "nudity"\n', "'iterations' must be a whole number",
                   "numbers"),
    "unknown-concept-late": ('[[concept]]\nconcept = "nudity"\n[[concept]]\nconcept = "a weird thing"\n',
                             "#2: 'a weird thing' is not a known concept", "--type"),
    "same-output-dir": ('output-dir = "runs/x"\n[[concept]]\nconcept = "nudity"\n[[concept]]\nconcept = "Van Gogh"\n',
                        "#1 and #2 both write to", "its own output-dir"),
    "missing-images": ('images = "nowhere"\n[[concept]]\nconcept = "nudity"\n', "images '", "relative to the recipe"),
    "unreadable": (None, "cannot read recipe", "TOML file"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_recipe_fails_with_one_line_before_anything_runs(run_cli, tmp_path, case, monkeypatch):
    text, message, hint = BAD[case]
    path = tmp_path / "recipe.toml"
    if text is not None:
        write(path, 'model = "tiny-random"\nmethod = "esd"\n' + text)
    monkeypatch.chdir(tmp_path)
    result = run_cli("erase", "--recipe", path, "--device", "cpu")
    assert result.exit_code == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:") and message in lines[0], lines
    assert " — " in lines[0] and hint in lines[0].split(" — ", 1)[1]
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("args, message", [
    ([], "no concept given"),
    (["--concept", "nudity", "--recipe", "r.toml"], "cannot be used together"),
])
def test_concept_or_recipe_exactly_one(run_cli, args, message):
    result = run_cli("erase", *args)
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and message in lines[0] and "--recipe" in lines[0]


# two entries on tiny-random ------------------------------------------------------------------

@pytest.fixture(scope="module")
def recipe_run(tmp_path_factory, images):
    from typer.testing import CliRunner

    from recare_cli.cli import app

    root = tmp_path_factory.mktemp("recipe-run")
    recipe = write(root / "recipe.toml", recipe_text(images))
    result = CliRunner().invoke(app, ["erase", "--recipe", str(recipe), "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.stderr
    return root, json_lines(result.stdout)


def test_recipe_runs_every_entry_into_its_own_run_directory(recipe_run):
    root, lines = recipe_run
    rows = [line for line in lines if "entry" in line]
    assert [(r["entry"], r["concepts"], r["method"], r["status"]) for r in rows] == [
        (1, ["nudity"], "esd", "done"), (2, ["tench"], "esd", "done")]
    assert lines[-1] == {"recipe": str(root / "recipe.toml"), "entries": 2, "done": 2, "reused": 0, "failed": 0,
                         "seconds": lines[-1]["seconds"]}
    for row, folder, iterations in ((rows[0], "nudity", 1), (rows[1], "tench", 2)):
        assert Path(row["run_dir"]) == root / "runs" / folder
        manifest = json.loads((root / "runs" / folder / "recare-run.json").read_text())
        assert manifest["status"] == "complete" and manifest["concepts"] == row["concepts"]
        assert manifest["cache_name"] == row["cache_name"] and manifest["parameters"]["iterations"] == iterations
        assert (root / "runs" / folder / "unet.safetensors").is_file()
    assert [e["stage"] for e in lines if e.get("event") == "stage_end"] == ["esd", "esd"]


def test_rerun_reuses_finished_entries_and_prints_one_table(run_cli, recipe_run):
    root, lines = recipe_run
    result = run_cli("erase", "--recipe", root / "recipe.toml", "--device", "cpu")
    assert result.exit_code == 0, result.stderr
    out = result.stdout
    assert "stage_start" not in result.stderr
    for header in ("concept", "method", "status", "run dir", "cache name", "seconds"):
        assert header in out
    rows = [line for line in lines if "entry" in line]
    for row in rows:
        assert row["cache_name"] in out
    assert out.count("reused") == 4  # two progress lines and two table rows


def test_a_failing_entry_is_reported_and_the_next_one_still_runs(run_cli, recipe_run, images, tmp_path):
    root, _ = recipe_run
    empty = tmp_path / "empty"
    empty.mkdir()
    # Entry 1 passes the checks but fails when it runs (no images); entry 2 is the finished tench run.
    recipe = write(tmp_path / "recipe.toml", recipe_text(images, runs=root / "runs", first_images=empty))
    result = run_cli("erase", "--recipe", recipe, "--device", "cpu", "--json")
    assert result.exit_code == 1
    rows = [line for line in json_lines(result.stdout) if "entry" in line]
    assert [(r["status"], r["run_dir"] is None) for r in rows] == [("failed", True), ("reused", False)]
    assert "holds no images" in rows[0]["error"]
    err = result.stderr.strip().splitlines()
    assert "[[concept]] #1 (nudity) failed" in err[0] and "going on with the next" in err[0]
    assert err[-1].startswith("Error: 1 of 2 recipe entries failed: #1 (nudity)") and " — " in err[-1]


# the plain shell loop the README shows -----------------------------------------------------------

def test_a_shell_loop_with_json_gives_one_result_line_per_concept(tmp_path, images):
    # --json ends with the result line, so `tail -n 1` keeps one line per concept; pipefail keeps
    # a failed run from hiding behind tail's success.
    script = (
        "set -eo pipefail\n"
        "for c in nudity tench; do\n"
        f'  recare erase --concept "$c" --type object --method esd --model tiny-random --device cpu {" ".join(TINY)}'
        f' --images "$IMAGES" --output-dir "runs/$c" --json | tail -n 1 >> erased.jsonl\n'
        "done\n"
    )
    env = {**os.environ, "PATH": f"{BIN_DIR}{os.pathsep}{os.environ['PATH']}", "IMAGES": str(images)}
    done = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    results = json_lines((tmp_path / "erased.jsonl").read_text())
    assert [Path(r["run_dir"]) for r in results] == [Path("runs/nudity"), Path("runs/tench")]
    for result in results:
        assert result["cache_name"] and (tmp_path / result["unet"]).is_file()
