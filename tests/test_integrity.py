"""Security and data integrity: no unpickling, no exploded weights saved, no manifest overwritten,
atomic and locked cache entries, output modes, no empty folders left, early --unet checks.

Each case states its input, the exit code, a message fragment, and what must be unchanged on disk.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from recare_cli.erase.loop import CHECKPOINT, LEGACY_CHECKPOINT
from recare_cli.manifest import RUN_RECORD, Writer
from noise_images import noise_images

CARESET = {"nudity_care_word": ["A man", "A woman"], "nudity_care_word_photo": ["A photo of man", "A photo of woman"]}
TINY = ["--model", "tiny-random", "--device", "cpu"]


class RunsCode:
    """Unpickling this object creates `marker`: what a hostile file could do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def evil_pickle(path: Path, marker: Path, wrap=lambda obj: obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(wrap(RunsCode(marker))))
    return path


def evil_torch_file(path: Path, marker: Path) -> Path:
    """A torch.save zip whose pickle would run code: what people share as weights."""
    torch.save({"state_dict": RunsCode(marker)}, path)
    assert not marker.exists()
    return path


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_error_line(stderr: str) -> str:
    errors = [line for line in stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr
    return errors[0]


@pytest.fixture
def no_model_load(monkeypatch):
    """Any pipeline load fails the test: the checks must come before it."""
    from recare_cli.models import runtime

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(runtime, "load_pipeline", refuse)


@pytest.fixture(scope="module")
def images(tmp_path_factory, tiny_model) -> Path:
    return noise_images(tmp_path_factory.mktemp("integrity") / "images", 2, (40, 48))


def esd_args(images: Path, out: Path, *extra) -> list:
    return ["erase", "--concept", "nudity", "--method", "esd", *TINY, "--resolution", "64", "--iterations", "3",
            "--prefix-steps", "2", "--images", images, "--checkpoint-every", "1", "--output-dir", out, *extra]


def unet_command(command: str, unet: Path, out: Path, export_format: str = "unet") -> list:
    """`command` reading the UNet weights `unet` and writing under `out`."""
    return {
        "generate": ["generate", *TINY, "--prompt", "a cat", "--unet", unet, "--output-dir", out],
        "eval": ["eval", *TINY, "-m", "clipscore", "--prompt", "a cat", "--unet", unet, "--output-dir", out],
        "export": ["export", unet, *TINY, "--format", export_format, "-o", out / "x.safetensors"],
    }[command]


@pytest.fixture(scope="module")
def unet_state(tiny_model) -> dict:
    from safetensors.torch import load_file

    return load_file(str(tiny_model / "unet" / "diffusion_pytorch_model.safetensors"))


# 1. checkpoints are never unpickled --------------------------------------------------------------

def test_planted_checkpoints_are_never_unpickled(run_cli, images, tmp_path, monkeypatch):
    """An interrupted run whose checkpoint files were replaced by pickles that would create a file."""
    from recare_cli.erase import loop

    out = tmp_path / "run"
    original = loop.StageLoop.step_done

    def interrupt(self, step, **losses):
        original(self, step, **losses)
        if step == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(loop.StageLoop, "step_done", interrupt)
    result = run_cli(*esd_args(images, out))
    assert result.exit_code == 130 and (out / CHECKPOINT).is_file()
    assert json.loads((out / RUN_RECORD).read_text())["status"] == "interrupted"
    monkeypatch.setattr(loop.StageLoop, "step_done", original)

    markers = [tmp_path / "ran-from-legacy", tmp_path / "ran-from-checkpoint"]
    evil_torch_file(out / LEGACY_CHECKPOINT, markers[0])
    evil_pickle(out / CHECKPOINT, markers[1])
    result = run_cli(*esd_args(images, out, "--json"))
    assert result.exit_code == 0, result.stderr
    assert not any(m.exists() for m in markers)
    warnings = [line for line in result.stderr.splitlines() if line.startswith("Warning:")]
    assert any("never unpickles" in w for w in warnings) and any("unreadable checkpoint" in w for w in warnings)
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert not [e for e in events if e.get("event") == "resume"]  # the stage started again
    assert json.loads((out / RUN_RECORD).read_text())["status"] == "complete"
    assert not (out / CHECKPOINT).exists() and not (out / LEGACY_CHECKPOINT).exists()


def test_a_checkpoint_holds_no_pickle_and_resumes_its_own_stage_only(tmp_path):
    """The checkpoint is safetensors + JSON; one written for another stage is not applied."""
    from safetensors import safe_open

    from recare_cli.erase.loop import STATE_KEY, StageLoop

    weight = torch.nn.Parameter(torch.randn(3, 2))
    optimizer = torch.optim.AdamW([weight], lr=0.1)
    writer = StageLoop(tmp_path, "erase-0", total=5, seed=1, checkpoint_every=1)
    writer.resume({"w": weight}, optimizer)
    weight.sum().backward()
    optimizer.step()
    writer.save_checkpoint(0)
    with safe_open(str(tmp_path / CHECKPOINT), framework="pt") as handle:
        state = json.loads(handle.metadata()[STATE_KEY])
        assert {"param/w", "optimizer/0/exp_avg", "rng/torch"} <= set(handle.keys())
    assert state["stage"] == "erase-0" and state["step"] == 0 and len(state["rng"]["python"][1]) == 625

    fresh = torch.nn.Parameter(torch.zeros(3, 2))
    assert StageLoop(tmp_path, "erase-0", 5, 1, 1).resume({"w": fresh}, torch.optim.AdamW([fresh], lr=0.1)) == 1
    assert torch.equal(fresh, weight)
    other = torch.nn.Parameter(torch.zeros(3, 2))
    assert StageLoop(tmp_path, "robust", 5, 1, 1).resume({"w": other}, torch.optim.AdamW([other], lr=0.1)) == 0
    assert not other.detach().any()


# 2. no torch.load of code, and torch's unsafe advice never shown ----------------------------------

@pytest.mark.parametrize("command", ["generate", "eval", "export"])
def test_a_pickled_object_as_unet_is_refused_before_loading(run_cli, tmp_path, no_model_load, command):
    marker = tmp_path / "code-ran"
    evil = evil_torch_file(tmp_path / "evil.pt", marker)
    out = tmp_path / "out"
    result = run_cli(*unet_command(command, evil, out))
    line = one_error_line(result.stderr)
    assert result.exit_code == 1
    assert "not a plain tensor file" in line and "never unpickles" in line
    assert "weights_only" not in result.stderr
    assert not marker.exists() and not out.exists()


def test_a_pickled_object_as_classifier_weights_is_refused(run_cli, tmp_path, images):
    marker = tmp_path / "code-ran"
    evil = evil_torch_file(tmp_path / "evil.pth", marker)
    result = run_cli("eval", *TINY, "-m", "object", "--target", "tench", "--classifier-weights", evil,
                     "--images", images, "--output-dir", tmp_path / "out")
    line = one_error_line(result.stderr)
    assert result.exit_code == 1 and "not a plain tensor file" in line and "weights_only" not in result.stderr
    assert not marker.exists()


def test_no_source_file_loads_pickles_with_code():
    """Every torch.load / pickle / joblib / np.load in the tree is restricted (a scan, so new ones are caught)."""
    import re

    unsafe = re.compile(r"torch\.load\((?!.*weights_only=True)|weights_only\s*=\s*False|pickle\.loads?\(|joblib|"
                        r"allow_pickle\s*=\s*True")
    root = Path(__file__).resolve().parents[1]
    offenders = [
        f"{path.relative_to(root)}:{number}: {line.strip()}"
        for folder in ("recare_cli", "bench", "plugins", "tests")
        for path in (root / folder).rglob("*.py") if path != Path(__file__).resolve()
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if unsafe.search(line.split("#")[0])
    ]
    assert not offenders, "\n".join(offenders)


# 3. manifests are never written over ------------------------------------------------------------

def erase_dir(folder: Path) -> Path:
    """What `recare erase` leaves: its stamped manifest, its CARE set, its weights."""
    folder.mkdir(parents=True)
    (folder / RUN_RECORD).write_text(json.dumps(Writer("erase", "abcd1234").stamp(
        {"method": "esd", "run_hash": "abcd1234", "status": "complete"})))
    (folder / "careset.json").write_text(json.dumps(CARESET))
    (folder / "unet.safetensors").write_bytes(b"weights")
    return folder


@pytest.mark.parametrize("case", ["generate", "careset", "eval", "export", "erase-into-generate", "legacy-erase"])
def test_no_command_writes_over_another_commands_manifest(run_cli, tmp_path, images, no_model_load, unet_state, case):
    from safetensors.torch import save_file

    source = tmp_path / "erased.safetensors"
    save_file(unet_state, str(source))
    target = erase_dir(tmp_path / "run")
    if case == "legacy-erase":  # a manifest from before written_by: told by its fields
        (target / RUN_RECORD).write_text(json.dumps({"method": "esd", "run_hash": "abcd1234"}))
    if case == "erase-into-generate":
        shutil.rmtree(target)
        target.mkdir()
        (target / RUN_RECORD).write_text(json.dumps(Writer("generate").stamp({"command": "generate"})))
    before = snapshot(target)
    args = {
        "generate": ["generate", *TINY, "--prompt", "a cat", "--output-dir", target],
        "legacy-erase": ["generate", *TINY, "--prompt", "a cat", "--output-dir", target],
        "careset": ["careset", "--concept", "nudity", "--images", images, "--output-dir", target, "--overwrite",
                    "--clip-model", "tiny-random"],
        "eval": ["eval", *TINY, "-m", "clipscore", "--images", images, "--output-dir", target],
        "export": ["export", source, *TINY, "--format", "diffusers", "-o", target, "--overwrite"],
        "erase-into-generate": esd_args(images, target),
    }[case]
    result = run_cli(*args)
    line = one_error_line(result.stderr)
    assert result.exit_code == 2, result.stderr
    assert RUN_RECORD in line and "written by `recare" in line and "pick another" in line
    assert snapshot(target) == before


def test_a_rerun_of_the_same_command_may_continue_its_folder(tmp_path):
    from recare_cli.manifest import claim

    (tmp_path / RUN_RECORD).write_text(json.dumps(Writer("generate").stamp({"command": "generate"})))
    claim(tmp_path, Writer("generate"))  # no error


# 4. exploded weights are never saved or used -----------------------------------------------------

@pytest.mark.parametrize("explode_at", [0, 2])
def test_weights_that_explode_are_never_saved(run_cli, images, tmp_path, monkeypatch, cache_dir, explode_at):
    """An optimizer step that makes the UNet non-finite: at the first step (before any checkpoint) or the last."""
    from recare_cli.cache import lookup_erased

    real_step = torch.optim.Adam.step
    calls = {"n": 0}

    def exploding_step(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        if calls["n"] == explode_at:
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("inf"))
        calls["n"] += 1
        return out

    monkeypatch.setattr(torch.optim.Adam, "step", exploding_step)  # ESD's optimizer, as published
    out = tmp_path / "run"
    result = run_cli(*esd_args(images, out, "--seed", str(100 + explode_at)))
    line = one_error_line(result.stderr)
    assert result.exit_code == 1
    assert "stage esd" in line and "not finite" in line and "lower the learning rate" in line
    assert not (out / "unet.safetensors").exists() and not (out / "stages" / "esd.safetensors").exists()
    manifest = json.loads((out / RUN_RECORD).read_text())
    assert manifest["status"] == "failed"
    assert lookup_erased(cache_dir, manifest["cache_name"]) is None
    if explode_at == 0:
        assert not (out / CHECKPOINT).exists()
    else:  # the last good checkpoint is kept, and it is finite
        from safetensors.torch import load_file

        kept = load_file(str(out / CHECKPOINT))
        assert all(torch.isfinite(t).all() for t in kept.values() if t.is_floating_point())


@pytest.mark.parametrize("command", ["generate", "eval", "export"])
def test_non_finite_unet_weights_are_refused_before_loading(run_cli, tmp_path, unet_state, no_model_load, command):
    from safetensors.torch import save_file

    bad = dict(unet_state)
    name = next(iter(bad))
    bad[name] = torch.full_like(bad[name], float("nan"))
    path = tmp_path / "exploded.safetensors"
    save_file(bad, str(path))
    out = tmp_path / "out"
    result = run_cli(*unet_command(command, path, out, export_format="single-file"))
    line = one_error_line(result.stderr)
    assert result.exit_code == 1 and "not finite" in line and "report it" not in line
    assert not out.exists()


# 5. cache entries: atomic, locked, used only when whole -------------------------------------------

BUILD_TWICE = """
import sys, time
from pathlib import Path
from recare_cli import models

builder, files = models.BUILTIN_MODELS["tiny-random"]

def logged(folder):
    with open(sys.argv[2], "a") as log:
        log.write("build\\n")
    time.sleep(1.0)  # widen the window in which another process could start building too
    builder(folder)

models.BUILTIN_MODELS["tiny-random"] = (logged, files)
models.builtin_path("tiny-random", Path(sys.argv[1]))
"""


def test_two_processes_building_a_builtin_at_once(tmp_path):
    cache, log = tmp_path / "fresh-cache", tmp_path / "builds.log"
    env = {**os.environ, "RECARE_CACHE_DIR": str(cache)}
    procs = [subprocess.Popen([sys.executable, "-c", BUILD_TWICE, str(cache), str(log)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [r[1][-2000:] for r in results]
    assert log.read_text().count("build") == 1  # one built it, the other waited and used it
    from recare_cli.cache import entry_complete
    from recare_cli.models import BUILTIN_MODELS, builtin_digest

    folder = cache / "models" / "tiny-random"
    assert entry_complete(folder, builtin_digest(BUILTIN_MODELS["tiny-random"][1]))
    assert not [p for p in (cache / "models").iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("damage", ["missing file", "truncated file", "no stamp"])
def test_a_half_written_builtin_is_rebuilt(tmp_path, tiny_model, damage):
    from recare_cli import models

    folder = tmp_path / "models" / "tiny-random"
    shutil.copytree(tiny_model, folder)
    weights = folder / "text_encoder" / "model.safetensors"
    if damage == "missing file":
        weights.unlink()
    elif damage == "truncated file":
        weights.write_bytes(weights.read_bytes()[:1000])
    else:
        (folder / "recare-builtin.json").unlink()
    assert models.builtin_path("tiny-random", tmp_path) == folder
    assert snapshot(folder) == snapshot(tiny_model)


def test_damaged_vocabulary_embeddings_are_rebuilt(tmp_path):
    from recare_cli.clip import load_clip, vocab_embeddings

    clip = load_clip("tiny-random", cache_dir=tmp_path)
    tokens = ["cat</w>", "dog</w>", "tree</w>"]
    first = vocab_embeddings(clip, tokens, cache_dir=tmp_path)
    [stored] = list((tmp_path / "clip").rglob("vocab-*.safetensors"))
    stored.write_bytes(stored.read_bytes()[:50])
    assert torch.equal(vocab_embeddings(clip, tokens, cache_dir=tmp_path), first)
    assert stored.stat().st_size > 50


# 6. outputs get the umask's mode ---------------------------------------------------------------------

def test_safetensors_outputs_get_the_umask_mode(tmp_path, run_cli, unet_state):
    from safetensors.torch import save_file

    from recare_cli.fsutil import write_safetensors

    source = tmp_path / "erased.safetensors"
    save_file(unet_state, str(source))
    previous = os.umask(0o027)
    try:
        write_safetensors(tmp_path / "a.safetensors", {"x": torch.zeros(2)})
        result = run_cli("export", source, *TINY, "--format", "unet", "-o", tmp_path / "exported.safetensors")
    finally:
        os.umask(previous)
    assert result.exit_code == 0, result.stderr
    for name in ("a.safetensors", "exported.safetensors"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o640, name


# 7. failed runs leave no empty output folder ----------------------------------------------------------

def test_failed_careset_and_export_leave_no_folder(run_cli, tmp_path, images, monkeypatch, unet_state):
    from safetensors.torch import save_file

    from recare_cli import clip
    from recare_cli.errors import RecareError

    def broken(*args, **kwargs):
        raise RecareError("CLIP could not be loaded")

    monkeypatch.setattr(clip, "load_clip", broken)
    existing = tmp_path / "existing"
    existing.mkdir()
    for out in (tmp_path / "new" / "careset", existing):
        result = run_cli("careset", "--concept", "nudity", "--images", images, "--output-dir", out)
        assert result.exit_code == 1 and "CLIP could not be loaded" in result.stderr
    assert not (tmp_path / "new").exists() and existing.is_dir()  # a folder that was there stays

    bad = {**unet_state, "conv_in.weight": torch.full_like(unet_state["conv_in.weight"], float("inf"))}
    save_file(bad, str(tmp_path / "bad.safetensors"))
    result = run_cli("export", tmp_path / "bad.safetensors", *TINY, "--format", "unet",
                     "-o", tmp_path / "exports" / "deep" / "x.safetensors")
    assert result.exit_code == 1 and not (tmp_path / "exports").exists()


# 8. --unet is checked before the model loads --------------------------------------------------------

@pytest.mark.parametrize("kind, code, fragment", [
    ("missing", 2, "no such file or folder"),
    ("wrong suffix", 2, "is not a weights file"),
    ("garbage safetensors", 1, "not a readable safetensors"),
    ("empty folder", 2, "folder without unet.safetensors"),
])
@pytest.mark.parametrize("command", ["generate", "eval"])
def test_bad_unet_fails_before_the_model_loads(run_cli, tmp_path, no_model_load, kind, code, fragment, command):
    path = {"missing": tmp_path / "nope.safetensors", "wrong suffix": tmp_path / "notes.txt",
            "garbage safetensors": tmp_path / "bad.safetensors", "empty folder": tmp_path / "folder"}[kind]
    if kind == "wrong suffix":
        path.write_text("hello")
    elif kind == "garbage safetensors":
        path.write_bytes(b"\x00" * 64)
    elif kind == "empty folder":
        path.mkdir()
    out = tmp_path / "out"
    result = run_cli(*unet_command(command, path, out))
    line = one_error_line(result.stderr)
    assert result.exit_code == code and fragment in line, result.stderr
    assert not out.exists()


# 9. a CARE set keyed for another concept --------------------------------------------------------------

@pytest.mark.parametrize("key, warned", [("dog", True), ("nudity", False)])
def test_a_careset_for_another_concept_is_warned_about(run_cli, tmp_path, images, monkeypatch, key, warned):
    from recare_cli.erase import run
    from recare_cli.errors import RecareError

    def stop(*args, **kwargs):
        raise RecareError("stopped before training")

    monkeypatch.setattr(run, "_load_models", stop)
    careset = tmp_path / "careset.json"
    careset.write_text(json.dumps({f"{key}_care_word": ["A man"], f"{key}_care_word_photo": ["A photo of man"]}))
    result = run_cli("erase", "--concept", "nudity", *TINY, "--images", images, "--careset", careset,
                     "--output-dir", tmp_path / "run")
    assert result.exit_code == 1 and "stopped before training" in result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("Warning:")]
    assert bool([w for w in warnings if "dog_care_word" in w and "nudity" in w]) == warned, result.stderr


# 10. duplicates in a recipe ------------------------------------------------------------------------------

@pytest.mark.parametrize("tables, fragment", [
    ('[[concept]]\nconcept = "nudity"\n\n[[concept]]\nconcept = "nudity"\n', "are the same run"),
    ('[[concept]]\nconcept = ["nudity", "nudity"]\n', "given twice"),
])
def test_recipe_duplicates_are_refused_before_anything_runs(run_cli, tmp_path, images, monkeypatch, tables, fragment):
    monkeypatch.chdir(tmp_path)
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(f'model = "tiny-random"\nmethod = "esd"\nresolution = 64\niterations = 1\nprefix_steps = 1\n'
                      f'device = "cpu"\nimages = "{images}"\n\n{tables}')
    result = run_cli("erase", "--recipe", recipe)
    line = one_error_line(result.stderr)
    assert result.exit_code == 2 and fragment in line, result.stderr
    assert not (tmp_path / "runs").exists()
