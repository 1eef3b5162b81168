"""An erase run stopped anywhere ends bit for bit as an uninterrupted one.

Interruptions are injected where the stage does its work, as the KeyboardInterrupt that Ctrl-C
raises: after a training step (tests/test_erase_cli.py, each of the five training stages), after
the first generated image, and inside the CARE-set build; one test sends a real SIGINT to a real
process to show the injected interrupt is faithful. File names come from the modules
(`loop.CHECKPOINT`), not literals.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from test_erase_cli import inputs, load, same_tensors, tiny_args  # noqa: F401 - `inputs` is a fixture

FROM_NOTHING = ["erase", "--concept", "nudity", "--model", "tiny-random", "--device", "cpu", "--resolution", "64",
                "--num-images", "2", "--iterations", "1", "--ti-steps", "1", "--rounds", "1", "--prefix-steps", "1",
                "--quiet"]


def _outputs(run: Path) -> dict:
    """Everything an erase run from nothing produces that a resume must reproduce exactly."""
    files = {"unet": load(run / "unet.safetensors"), "tokens": load(run / "tokens.safetensors")}
    images = {p.name: p.read_bytes() for p in sorted((run / "images" / "nudity").glob("*.png"))}
    return {**files, "images": images, "careset": (run / "careset.json").read_text()}


def _same_outputs(a: dict, b: dict) -> bool:
    return (same_tensors(a["unet"], b["unet"]) and same_tensors(a["tokens"], b["tokens"])
            and a["images"] == b["images"] and a["careset"] == b["careset"])


@pytest.fixture(scope="module")
def from_nothing(tmp_path_factory) -> dict:
    from typer.testing import CliRunner

    from recare_cli.cli import app

    out = tmp_path_factory.mktemp("from-nothing") / "run"
    result = CliRunner().invoke(app, [*FROM_NOTHING, "--output-dir", str(out)])
    assert result.exit_code == 0, result.stderr
    outputs = _outputs(out)
    assert len(outputs["images"]) == 2
    return outputs


def _interrupt_after_first_image(monkeypatch):
    from recare_cli import generate

    real = generate.atomic_path

    @contextmanager
    def once(path):
        with real(path) as tmp:
            yield tmp
        raise KeyboardInterrupt  # the first image is in place; Ctrl-C before the second

    monkeypatch.setattr(generate, "atomic_path", once)
    return lambda: monkeypatch.setattr(generate, "atomic_path", real)


def _interrupt_in_careset(monkeypatch):
    from recare_cli.careset import build

    real = build.select_tokens

    def stop(*args, **kwargs):
        raise KeyboardInterrupt  # CLIP loaded, images embedded, nothing of the CARE set written

    monkeypatch.setattr(build, "select_tokens", stop)
    return lambda: monkeypatch.setattr(build, "select_tokens", real)


@pytest.mark.parametrize("stage", ["images", "careset"])
def test_interrupted_input_stage_resumes_to_the_same_run(run_cli, from_nothing, tmp_path, monkeypatch, stage):
    out = tmp_path / "run"
    restore = {"images": _interrupt_after_first_image, "careset": _interrupt_in_careset}[stage](monkeypatch)
    result = run_cli(*FROM_NOTHING, "--output-dir", out)
    assert result.exit_code == 130, result.stderr
    manifest = json.loads((out / "recare-run.json").read_text())
    assert manifest["status"] == "interrupted" and stage not in manifest["stages"]
    assert not (out / "unet.safetensors").exists()
    if stage == "images":
        assert len(list((out / "images" / "nudity").glob("*.png"))) == 1
    restore()

    result = run_cli(*FROM_NOTHING, "--output-dir", out)
    assert result.exit_code == 0, result.stderr
    assert _same_outputs(_outputs(out), from_nothing)


# checkpoints: what they restore, and what happens when one cannot be read ------------------------

# ReCARE's erase stages keep a momentum buffer (APG); published ESD has none.
APG_MOMENTUM = ("--method", "recare", "--rounds", "1", "--iterations", "3", "--apg-momentum", "0.5")


@pytest.fixture(scope="module")
def momentum_reference(tmp_path_factory, inputs) -> dict:  # noqa: F811 - the imported fixture
    from typer.testing import CliRunner

    from recare_cli.cli import app

    out = tmp_path_factory.mktemp("apg-momentum") / "run"
    result = CliRunner().invoke(app, [str(a) for a in tiny_args(inputs, out, *APG_MOMENTUM)])
    assert result.exit_code == 0, result.stderr
    return load(out / "unet.safetensors")


def _interrupted_run(run_cli, inputs, out: Path, monkeypatch, stop_step: int = 1) -> None:  # noqa: F811
    from recare_cli.erase import loop

    real = loop.StageLoop.step_done

    def interrupt(self, step, **losses):
        real(self, step, **losses)
        if step == stop_step:
            raise KeyboardInterrupt

    monkeypatch.setattr(loop.StageLoop, "step_done", interrupt)
    result = run_cli(*tiny_args(inputs, out, *APG_MOMENTUM))
    monkeypatch.setattr(loop.StageLoop, "step_done", real)
    assert result.exit_code == 130, result.stderr
    assert (out / loop.CHECKPOINT).exists()


def test_resume_restores_the_momentum_buffer(run_cli, inputs, momentum_reference, tmp_path, monkeypatch):  # noqa: F811
    out = tmp_path / "run"
    _interrupted_run(run_cli, inputs, out, monkeypatch)
    result = run_cli(*tiny_args(inputs, out, *APG_MOMENTUM, "--json"))
    assert result.exit_code == 0, result.stderr
    assert {"event": "resume", "stage": "erase-0", "step": 2} in [json.loads(x) for x in result.stdout.splitlines()]
    assert same_tensors(load(out / "unet.safetensors"), momentum_reference)


def test_an_unreadable_checkpoint_restarts_the_stage(run_cli, inputs, momentum_reference, tmp_path, monkeypatch):  # noqa: F811
    from recare_cli.erase import loop

    out = tmp_path / "run"
    _interrupted_run(run_cli, inputs, out, monkeypatch)
    checkpoint = out / loop.CHECKPOINT
    if checkpoint.is_dir():  # a checkpoint written as a folder of files: tear each one
        for part in checkpoint.iterdir():
            part.write_bytes(part.read_bytes()[:10])
    else:
        checkpoint.write_bytes(checkpoint.read_bytes()[:100])  # torn by a crash mid-write (or foreign)
    result = run_cli(*tiny_args(inputs, out, *APG_MOMENTUM, "--json"))
    assert result.exit_code == 0, result.stderr
    assert "unreadable checkpoint" in result.stderr
    assert not [x for x in result.stdout.splitlines() if '"resume"' in x]
    assert same_tensors(load(out / "unet.safetensors"), momentum_reference)  # restarted from step 0 with fresh seeds
    entries = [json.loads(x) for x in (out / loop.LOSS_LOG).read_text().splitlines()]
    assert [e["step"] for e in entries if e["stage"] == "erase-0"] == [0, 1, 2]


def test_a_torn_loss_log_line_is_dropped_on_resume(run_cli, inputs, momentum_reference, tmp_path, monkeypatch):  # noqa: F811
    from recare_cli.erase import loop

    out = tmp_path / "run"
    _interrupted_run(run_cli, inputs, out, monkeypatch)
    log = out / loop.LOSS_LOG
    with open(log, "a", encoding="utf-8") as handle:
        handle.write('{"stage": "erase-0", "step": 2, "lo')  # a kill in the middle of a line
    result = run_cli(*tiny_args(inputs, out, *APG_MOMENTUM))
    assert result.exit_code == 0, result.stderr
    entries = [json.loads(x) for x in log.read_text().splitlines()]  # every line parses
    erase_0 = [(e["stage"], e["step"]) for e in entries if e["stage"] == "erase-0"]
    assert erase_0 == [("erase-0", 0), ("erase-0", 1), ("erase-0", 2)]
    assert same_tensors(load(out / "unet.safetensors"), momentum_reference)


ESD_ARGS = ["erase", "--concept", "nudity", "--model", "tiny-random", "--device", "cpu", "--resolution", "64",
            "--method", "esd", "--iterations", "3", "--prefix-steps", "2", "--checkpoint-every", "1"]


def test_an_interrupted_esd_run_resumes_bit_for_bit(run_cli, tmp_path, monkeypatch):
    """ESD's one stage resumes its weights and its Adam moments from the checkpoint."""
    from recare_cli.erase import loop

    reference = tmp_path / "whole"
    assert run_cli(*ESD_ARGS, "--output-dir", reference).exit_code == 0
    out = tmp_path / "run"
    real = loop.StageLoop.step_done

    def interrupt(self, step, **losses):
        real(self, step, **losses)
        if step == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(loop.StageLoop, "step_done", interrupt)
    assert run_cli(*ESD_ARGS, "--output-dir", out).exit_code == 130
    monkeypatch.setattr(loop.StageLoop, "step_done", real)
    result = run_cli(*ESD_ARGS, "--output-dir", out, "--json")
    assert result.exit_code == 0, result.stderr
    assert {"event": "resume", "stage": "esd", "step": 2} in [json.loads(x) for x in result.stdout.splitlines()]
    assert same_tensors(load(out / "unet.safetensors"), load(reference / "unet.safetensors"))


SLOW_STEPS = """
import sys, time
from recare_cli.erase import loop
real = loop.StageLoop.step_done
def slow(self, step, **losses):
    real(self, step, **losses)
    time.sleep(0.5)  # time for the test's SIGINT to land mid-stage
loop.StageLoop.step_done = slow
from recare_cli.cli import main
sys.argv = ["recare", *sys.argv[1:]]
main()
"""


def test_a_real_sigint_mid_stage_resumes_to_the_same_weights(run_cli, inputs, momentum_reference, tmp_path):  # noqa: F811
    from recare_cli.erase import loop

    out = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "-c", SLOW_STEPS, *map(str, tiny_args(inputs, out, *APG_MOMENTUM))],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (out / loop.CHECKPOINT).exists():
        assert process.poll() is None and time.monotonic() < deadline, process.stderr.read() if process.poll() else ""
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert not (out / "unet.safetensors").exists()
    result = run_cli(*tiny_args(inputs, out, *APG_MOMENTUM))
    assert result.exit_code == 0, result.stderr
    assert same_tensors(load(out / "unet.safetensors"), momentum_reference)
