"""`erase --recipe` and `eval` under a real `accelerate launch` with two CPU processes (gloo), as on a CI machine.

Launches are slow (every process imports torch), so each one serves several assertions. A spy,
installed through sitecustomize in the launched processes only, logs which process ran which
recipe entry and rendered which images, then calls the real function.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SPY = """
import json, os

if os.environ.get("RANK") is not None:
    from recare_cli import generate
    from recare_cli.evaluate import run as evaluate_run
    from recare_cli.erase import recipe

    def log(**record):
        with open(os.environ["RECARE_TEST_SPY"], "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"rank": int(os.environ["RANK"]), **record}) + "\\n")

    run_entry, render_images, write_results = recipe._run_entry, generate.render_images, evaluate_run.write_results

    def spied_run_entry(entry, reporter):
        log(entry=entry.index, device=entry.runtime.device)
        return run_entry(entry, reporter)

    def spied_render_images(pipe, jobs, output_dir, settings, reporter):
        log(folder=str(output_dir), files=[job.file for job in jobs])
        return render_images(pipe, jobs, output_dir, settings, reporter)

    def spied_write_results(output_dir, records, run):
        log(results=str(output_dir))
        return write_results(output_dir, records, run)

    recipe._run_entry, generate.render_images = spied_run_entry, spied_render_images
    evaluate_run.write_results = spied_write_results
"""

# Entry 3 repeats entry 1 (same run directory), so it must run after it, in the same process;
# entry 2 is ReCARE rendering its own training images (given a CARE set: building one is slow);
# entry 4 passes the checks but fails when it runs (an empty --images folder).
RECIPE = """
model = "tiny-random"
device = "cpu"
method = "esd"
resolution = 64
iterations = 1
prefix-steps = 1
checkpoint-every = 1

[[concept]]
concept = "church"
type = "object"

[[concept]]
concept = "nudity"
method = "recare"
careset = "careset.json"
num-images = 2
ti-steps = 1
rounds = 1

[[concept]]
concept = "church"
type = "object"
checkpoint-every = 2  # the same run as #1 (not hashed); an identical entry would be refused as a duplicate

[[concept]]
concept = "tench"
type = "object"
images = "empty"
"""

EVAL_ARGS = ["--model", "tiny-random", "--device", "cpu", "-m", "care", "--targets", "cat,person", "-m", "clipscore",
             "--compare", "base", "-p", "a cat", "-p", "a dog", "--num-images", "2", "--steps", "2",
             "--height", "64", "--width", "64", "--json"]


def launch(cwd: Path, *args: str) -> tuple[subprocess.CompletedProcess, list[dict]]:
    """`accelerate launch` two CPU processes of `python -m recare_cli ARGS`; (the run, the spy's records)."""
    from test_generate import _free_port  # tests/ is on sys.path, as pytest imports test modules

    (cwd / "spy").mkdir(exist_ok=True)
    (cwd / "spy" / "sitecustomize.py").write_text(SPY)
    log = cwd / "spy.jsonl"
    log.unlink(missing_ok=True)
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()), "-m", "recare_cli", *map(str, args),
    ]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "RECARE_TEST_SPY": str(log),
           "PYTHONPATH": os.pathsep.join([str(cwd / "spy"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, env=env, timeout=900)
    spied = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
    return done, spied


def write_careset(folder: Path) -> None:
    (folder / "careset.json").write_text(json.dumps(
        {"nudity_care_word": ["A cat", "A dog"], "nudity_care_word_photo": ["A photo of cat", "A photo of dog"]}))


def json_lines(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines()]


# erase --recipe --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def recipe_launch(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("recipe-launch")
    (root / "empty").mkdir()
    (root / "recipe.toml").write_text(RECIPE)
    write_careset(root)
    return root, *launch(root, "erase", "--recipe", "recipe.toml", "--json")


def test_recipe_entries_are_shared_out_and_each_runs_once(recipe_launch):
    root, done, spied = recipe_launch
    assert done.returncode == 1, done.stderr[-3000:]
    ran = {record["entry"]: record for record in spied if "entry" in record}
    assert sorted(ran) == [1, 2, 3, 4] and len(ran) == len([r for r in spied if "entry" in r])  # once each
    assert {record["rank"] for record in ran.values()} == {0, 1}  # both processes worked
    assert ran[1]["rank"] == ran[3]["rank"]  # one run directory, one process
    assert {record["device"] for record in ran.values()} == {"cpu"}
    # The ReCARE entry rendered all of its training images itself, not split with the other process.
    renders = [record for record in spied if "folder" in record]
    assert [(r["rank"], sorted(r["files"])) for r in renders] == [
        (ran[2]["rank"], ["A_photo_of_a_nude_person_0.png", "A_photo_of_a_nude_person_1.png"])]


def test_recipe_prints_one_summary_and_fails_for_the_failed_entry(recipe_launch):
    root, done, _ = recipe_launch
    lines = json_lines(done.stdout)
    rows = [line for line in lines if "entry" in line]
    assert [(r["entry"], r["status"]) for r in rows] == [(1, "done"), (2, "done"), (3, "reused"), (4, "failed")]
    assert rows[0]["run_dir"] == rows[2]["run_dir"] and "holds no images" in rows[3]["error"]
    summaries = [line for line in lines if "recipe" in line]
    assert summaries == [lines[-1]]
    assert {k: lines[-1][k] for k in ("entries", "done", "reused", "failed")} == \
        {"entries": 4, "done": 2, "reused": 1, "failed": 1}
    for row in rows[:3]:
        manifest = json.loads((root / row["run_dir"] / "recare-run.json").read_text())
        assert manifest["status"] == "complete" and manifest["concepts"] == row["concepts"]
    errors = [line for line in done.stderr.splitlines() if line.startswith("Error:")]
    assert errors == [errors[0]] and errors[0].startswith("Error: 1 of 4 recipe entries failed: #4 (tench)")


def test_a_launched_rerun_reuses_every_finished_entry(recipe_launch):
    root, _, _ = recipe_launch
    done, spied = launch(root, "erase", "--recipe", "recipe.toml", "--json")
    assert done.returncode == 1, done.stderr[-3000:]
    rows = [line for line in json_lines(done.stdout) if "entry" in line]
    assert [r["status"] for r in rows] == ["reused", "reused", "reused", "failed"]
    assert sorted(record["entry"] for record in spied if "entry" in record) == [1, 2, 3, 4]
    assert not [record for record in spied if "folder" in record]  # no image rendered again


# eval ------------------------------------------------------------------------------------------

def test_eval_splits_the_images_and_writes_one_set_of_results(recipe_launch, run_cli, tmp_path):
    root, first, _ = recipe_launch
    unet = root / next(r["run_dir"] for r in json_lines(first.stdout) if r.get("entry") == 1)
    done, spied = launch(tmp_path, "eval", *EVAL_ARGS, "--unet", unet, "--output-dir", "split")
    assert done.returncode == 0, done.stderr[-3000:]
    split = tmp_path / "split"
    assert [(r["rank"], r["results"]) for r in spied if "results" in r] == [(0, "split")]  # written once
    for label in ("erased", "base"):
        renders = [r for r in spied if r.get("folder") == str(Path("split") / "images" / label)]
        assert {r["rank"] for r in renders} == {0, 1}
        files = [f for r in renders for f in r["files"]]
        assert sorted(files) == ["a_cat_0.png", "a_cat_1.png", "a_dog_0.png", "a_dog_1.png"]  # each once
        assert len(json_lines((split / "images" / label / "manifest.jsonl").read_text())) == 4
    assert sorted(p.name for p in split.iterdir()) == ["grid.png", "images", "results.csv", "results.json"]

    single = run_cli("eval", *EVAL_ARGS, "--unet", unet, "--output-dir", tmp_path / "single")
    assert single.exit_code == 0, single.stderr
    # The main process alone prints: the same results as one process, each event once.
    launched, alone = json_lines(done.stdout), json_lines(single.stdout)
    events = [json.dumps(line) for line in launched if "event" in line]
    assert len(events) == len(set(events))
    assert [line for line in launched if "metric" in line and "event" not in line] == \
        [line for line in alone if "metric" in line and "event" not in line]
    assert launched[-1] == {"files": ["split/results.csv", "split/results.json", "split/grid.png"]}
    assert json.loads((split / "results.json").read_text())["results"] == \
        json.loads((tmp_path / "single" / "results.json").read_text())["results"]
    assert (split / "results.csv").read_text() == (tmp_path / "single" / "results.csv").read_text()


# sharing out, without a launch -------------------------------------------------------------------

def test_entries_sharing_a_run_directory_go_to_one_process(tmp_path, tiny_model):
    from recare_cli.erase.recipe import plan_entries, read_recipe, share_out
    from recare_cli.erase.run import EraseRequest
    from recare_cli.models import Runtime

    (tmp_path / "empty").mkdir()
    write_careset(tmp_path)
    (tmp_path / "recipe.toml").write_text(RECIPE + '\n[[concept]]\nconcept = "church"\ntype = "object"\niterations = 2\n')
    entries = plan_entries(read_recipe(tmp_path / "recipe.toml"), EraseRequest(concepts=[]), Runtime(), set())
    # 1 and 3 are the same run; 5 differs from them only in iterations, so it is a run of its own;
    # 4 cannot be hashed (empty --images) and counts as its own.
    assert share_out(entries, 2) == [[0, 2, 4], [1, 3]]
    assert share_out(entries, 3) == [[0, 2], [1, 4], [3]]
    assert share_out(entries, 1) == [[0, 1, 2, 3, 4]]
