"""The training stages' shared loop, unit by unit: what a checkpoint holds and restores, when it is
written, what the loss log keeps, and what `--report-to tensorboard` receives.

No model is trained here: a stage's loop is driven by hand with a two-tensor AdamW, so each test
takes milliseconds (the end-to-end resumes are in test_resume.py and test_erase_cli.py). Reporters
are real ones in JSON mode writing to a buffer: their lines are what `--json` users read.
"""

from __future__ import annotations

import copy
import io
import json
import random

import numpy as np
import pytest
import torch

from recare_cli.erase import loop
from recare_cli.erase.guidance import MomentumBuffer
from recare_cli.erase.loop import StageLoop
from recare_cli.erase.tracking import Tracker
from recare_cli.errors import RecareError
from recare_cli.output import JSON, Reporter, Task
from test_erase_cli import checkpoint_state


def json_reporter() -> tuple[Reporter, io.StringIO, io.StringIO]:
    stdout, stderr = io.StringIO(), io.StringIO()
    return Reporter(JSON, stdout=stdout, stderr=stderr), stdout, stderr


def events(stdout: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stdout.getvalue().splitlines()]


class RecordingTracker(Tracker):
    """Keeps what the loop hands to tracking (the TensorBoard writer is tested on its own below)."""

    def __init__(self):
        self.losses, self.done = [], []

    def log_losses(self, stage, step, values):
        self.losses.append((stage, step, values))

    def stage_done(self, stage, step):
        self.done.append((stage, step))


def make_stage(seed: int = 3):
    """Two trained tensors, AdamW with non-default betas, one filled and one empty momentum buffer."""
    generator = torch.Generator().manual_seed(seed)
    params = {"w": torch.nn.Parameter(torch.randn(3, 2, generator=generator)),
              "b": torch.nn.Parameter(torch.randn(2, generator=generator))}
    optimizer = torch.optim.AdamW(params.values(), lr=0.05, betas=(0.8, 0.95), weight_decay=0.01)
    buffers = [MomentumBuffer(0.5), MomentumBuffer(0.5)]
    return params, optimizer, buffers


def train_step(params, optimizer, buffers) -> None:
    """One step that draws from all three RNGs, as a stage's step does."""
    noise = torch.randn(3, 2)
    scale = random.random() + np.random.rand()
    loss = ((params["w"] * noise).sum() + params["b"].sum()) ** 2 * scale
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    buffers[0].update(params["w"].detach().clone())


def draws() -> tuple:
    """What the next step would draw; gauss() and standard_normal() also read their cached second value."""
    return random.random(), random.gauss(0, 1), np.random.rand(), np.random.standard_normal(), torch.randn(4)


def same_draws(a: tuple, b: tuple) -> bool:
    return a[:4] == b[:4] and torch.equal(a[4], b[4])


# seeds ------------------------------------------------------------------------------------------

def test_seed_everything_seeds_python_numpy_and_torch():
    random.seed(11), np.random.seed(11), torch.manual_seed(11)
    expected = draws()
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    loop.seed_everything(11)
    assert same_draws(draws(), expected)


def test_a_fresh_stage_starts_at_step_0_from_its_seed(tmp_path):
    params, optimizer, buffers = make_stage()
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    expected = draws()
    assert StageLoop(tmp_path, "erase-0", total=4, seed=7, checkpoint_every=1).resume(params, optimizer, buffers) == 0
    assert same_draws(draws(), expected)


# what a checkpoint holds and restores -------------------------------------------------------------

def test_a_checkpoint_restores_weights_optimizer_buffers_rngs_and_step(tmp_path):
    params, optimizer, buffers = make_stage()
    writer = StageLoop(tmp_path, "erase-0", total=6, seed=1, checkpoint_every=100)
    assert writer.resume(params, optimizer, buffers) == 0
    for step in range(3):
        train_step(params, optimizer, buffers)
    random.gauss(0, 1), np.random.standard_normal()  # leave a cached second Gaussian in both
    writer.save_checkpoint(2)
    saved_optimizer = copy.deepcopy(optimizer.state_dict())  # the live one changes with the next step
    rng_states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    train_step(params, optimizer, buffers)
    expected_weights = {name: p.detach().clone() for name, p in params.items()}
    expected_buffer = buffers[0].running_average.clone()
    random.setstate(rng_states[0]), np.random.set_state(rng_states[1]), torch.set_rng_state(rng_states[2])
    expected_draws = draws()

    loop.seed_everything(99)  # the resumed process starts from other RNG states
    fresh, fresh_optimizer, fresh_buffers = make_stage(seed=5)
    fresh_buffers[1].running_average = torch.ones(3, 2)  # was empty when saved: must be emptied again
    reporter, stdout, _ = json_reporter()
    task = Task()
    reader = StageLoop(tmp_path, "erase-0", total=6, seed=1, checkpoint_every=100, reporter=reporter, task=task)
    assert reader.resume(fresh, fresh_optimizer, fresh_buffers) == 3
    assert task.completed == 3  # the progress bar continues where the stage stopped
    assert events(stdout) == [{"event": "resume", "stage": "erase-0", "step": 3}]
    assert fresh_optimizer.state_dict()["param_groups"] == saved_optimizer["param_groups"]  # betas a tuple again
    restored = fresh_optimizer.state_dict()["state"]
    assert restored.keys() == saved_optimizer["state"].keys()
    for index, entry in saved_optimizer["state"].items():
        assert restored[index].keys() == entry.keys()
        assert all(torch.equal(restored[index][key], value) for key, value in entry.items())
    assert fresh_buffers[1].running_average is None
    assert same_draws(draws(), expected_draws)

    random.seed(0), np.random.seed(0), torch.manual_seed(0)  # the same step again, from the restored state
    reader.resume(fresh, fresh_optimizer, fresh_buffers)
    train_step(fresh, fresh_optimizer, fresh_buffers)
    assert all(torch.equal(fresh[name], expected_weights[name]) for name in params)
    assert torch.equal(fresh_buffers[0].running_average, expected_buffer)


def test_a_python_rng_without_a_cached_gaussian_is_restored(tmp_path):
    params, optimizer, buffers = make_stage()
    writer = StageLoop(tmp_path, "robust", total=4, seed=1, checkpoint_every=100)
    writer.resume(params, optimizer, buffers)
    writer.save_checkpoint(0)  # just seeded: Python's RNG holds no cached Gaussian
    expected = draws()
    loop.seed_everything(5)
    random.gauss(0, 1)
    assert StageLoop(tmp_path, "robust", 4, 1, 100).resume(*make_stage()) == 1
    assert same_draws(draws(), expected)


def test_a_checkpoint_is_safetensors_with_the_stage_step_and_every_tensor_named(tmp_path):
    from safetensors import safe_open

    params, optimizer, buffers = make_stage()
    writer = StageLoop(tmp_path, "inversion-1", total=5, seed=1, checkpoint_every=100)
    writer.resume(params, optimizer, buffers)
    train_step(params, optimizer, buffers)
    writer.save_checkpoint(4)
    with safe_open(str(tmp_path / loop.CHECKPOINT), framework="pt") as handle:
        state = json.loads(handle.metadata()[loop.STATE_KEY])
        keys = set(handle.keys())
        assert torch.equal(handle.get_tensor("param/w"), params["w"].detach())
        assert torch.equal(handle.get_tensor("buffer/0"), buffers[0].running_average)
    assert (state["format"], state["stage"], state["step"]) == (loop.CHECKPOINT_FORMAT, "inversion-1", 4)
    assert state["buffers"] == [True, False]
    assert {"param/w", "param/b", "buffer/0", "rng/torch", "optimizer/0/exp_avg", "optimizer/1/exp_avg_sq"} <= keys
    assert "buffer/1" not in keys


def checkpoint_of(tmp_path, stage="erase-0", **change):
    """A valid checkpoint written by the loop, then rewritten with `change` applied to its tensors."""
    from safetensors import safe_open

    from recare_cli.fsutil import write_safetensors

    params, optimizer, buffers = make_stage()
    writer = StageLoop(tmp_path, stage, total=5, seed=1, checkpoint_every=100)
    writer.resume(params, optimizer, buffers)
    train_step(params, optimizer, buffers)
    writer.save_checkpoint(1)
    with safe_open(str(tmp_path / loop.CHECKPOINT), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        metadata = handle.metadata()
    tensors.update(change)
    write_safetensors(tmp_path / loop.CHECKPOINT, tensors, metadata)


@pytest.mark.parametrize("case", ["weight shape", "torch rng dtype", "torch rng shape", "more buffers",
                                  "more param groups", "torn"])
def test_a_checkpoint_that_does_not_fit_restarts_the_stage_with_a_warning(tmp_path, case):
    """Anything that does not fit the stage (shape, RNG state, optimizer) restarts it; nothing crashes."""
    changes = {"weight shape": {"param/w": torch.zeros(2, 3)},
               "torch rng dtype": {"rng/torch": torch.get_rng_state().float()},
               "torch rng shape": {"rng/torch": torch.get_rng_state()[:-1]}}
    checkpoint_of(tmp_path, **changes.get(case, {}))
    if case == "torn":
        path = tmp_path / loop.CHECKPOINT
        path.write_bytes(path.read_bytes()[:200])
    params, optimizer, buffers = make_stage(seed=5)
    if case == "more buffers":
        buffers.append(MomentumBuffer(0.5))
    if case == "more param groups":
        extra = torch.nn.Parameter(torch.zeros(1))
        optimizer.add_param_group({"params": [extra]})
    before = {name: p.detach().clone() for name, p in params.items()}
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    expected = draws()

    reporter, stdout, stderr = json_reporter()
    assert StageLoop(tmp_path, "erase-0", 5, 1, 100, reporter=reporter).resume(params, optimizer, buffers) == 0
    warning = " ".join(stderr.getvalue().split())
    assert "unreadable checkpoint" in warning and str(tmp_path / loop.CHECKPOINT) in warning
    assert "erase-0 starts again" in warning
    assert all(torch.equal(params[name], before[name]) for name in params)
    assert same_draws(draws(), expected) and events(stdout) == []


def test_another_stages_checkpoint_is_ignored_silently(tmp_path):
    checkpoint_of(tmp_path, stage="inversion-0")
    reporter, stdout, stderr = json_reporter()
    assert StageLoop(tmp_path, "erase-1", 5, 1, 100, reporter=reporter).resume(*make_stage()) == 0
    assert stderr.getvalue() == "" and events(stdout) == []


def test_an_old_pickled_checkpoint_is_named_in_a_warning_and_removed_with_the_stage(tmp_path):
    legacy = tmp_path / loop.LEGACY_CHECKPOINT
    legacy.write_bytes(b"not read")
    reporter, _, stderr = json_reporter()
    stage = StageLoop(tmp_path, "esd", 2, 1, 100, reporter=reporter)
    assert stage.resume(*make_stage()[:2]) == 0
    warning = " ".join(stderr.getvalue().split())
    assert str(legacy) in warning and "a pickled checkpoint" in warning
    assert warning.endswith(": recare never unpickles files")
    stage.save_stage(tmp_path / "out.safetensors", {"w": torch.ones(2)})
    assert not legacy.exists()


# when checkpoints are written (--checkpoint-every) ----------------------------------------------

@pytest.mark.parametrize(("total", "every", "written_after"), [(5, 2, [2, 4]), (4, 2, [2]), (3, 1, [1, 2]),
                                                             (3, 5, [])])
def test_checkpoints_are_written_every_n_steps_but_not_after_the_last(tmp_path, total, every, written_after):
    params, optimizer, buffers = make_stage()
    reporter, stdout, _ = json_reporter()
    stage = StageLoop(tmp_path, "erase-0", total, seed=1, checkpoint_every=every, reporter=reporter)
    stage.resume(params, optimizer, buffers)
    steps_in_file = []
    for step in range(total):
        train_step(params, optimizer, buffers)
        stage.step_done(step, loss=torch.tensor(1.0))
        if (tmp_path / loop.CHECKPOINT).is_file():
            steps_in_file.append(checkpoint_state(tmp_path / loop.CHECKPOINT)["step"])
    assert [e["step"] for e in events(stdout)] == written_after
    assert all(e == {"event": "checkpoint", "stage": "erase-0", "step": e["step"]} for e in events(stdout))
    assert sorted(set(steps_in_file)) == [n - 1 for n in written_after]  # the step it resumes after


# the loss log and what tracking receives ----------------------------------------------------------

def test_each_step_appends_its_losses_to_the_log_tracking_and_the_progress_bar(tmp_path):
    tracker, task = RecordingTracker(), Task()
    stage = StageLoop(tmp_path, "robust", total=3, seed=1, checkpoint_every=100, task=task, tracker=tracker)
    stage.resume(*make_stage())
    for step in range(2):
        stage.step_done(step, loss=torch.tensor(0.5 + step), erase_loss=torch.tensor(0.25), retain_loss=torch.tensor(2.0))
    expected = [{"stage": "robust", "step": s, "loss": 0.5 + s, "erase_loss": 0.25, "retain_loss": 2.0} for s in (0, 1)]
    assert [json.loads(line) for line in (tmp_path / loop.LOSS_LOG).read_text().splitlines()] == expected
    assert tracker.losses == [("robust", e["step"], {k: e[k] for k in ("loss", "erase_loss", "retain_loss")})
                              for e in expected]
    assert task.completed == 2
    stage.save_stage(tmp_path / "robust.safetensors", {"w": torch.ones(2)}, {"note": "kept"})
    assert tracker.done == [("robust", 3)]


def test_the_progress_bar_shows_the_loss(tmp_path):
    reporter = Reporter("human", stdout=io.StringIO(), stderr=(stderr := io.StringIO()))
    with reporter.progress("erase-0", total=2) as task:
        stage = StageLoop(tmp_path, "erase-0", total=2, seed=1, checkpoint_every=100, task=task)
        stage.resume(*make_stage())
        stage.step_done(0, loss=torch.tensor(0.125))
    assert "loss 0.125" in stderr.getvalue()


def write_log(path, lines: list) -> None:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))


def test_resume_drops_the_interrupted_attempts_log_lines_and_keeps_the_rest(tmp_path):
    checkpoint_of(tmp_path, stage="erase-1")  # saved after step 1: resumes at 2
    other = [{"stage": "erase-0", "step": s, "loss": 1.0} for s in range(4)]
    mine = [{"stage": "erase-1", "step": s, "loss": 2.0} for s in range(4)]
    torn = '{"stage": "erase-1", "st'  # a kill mid-line; whatever follows it is kept or dropped on its own
    write_log(tmp_path / loop.LOSS_LOG, [mine[0], torn, *other, *mine[1:]])
    assert StageLoop(tmp_path, "erase-1", 5, 1, 100).resume(*make_stage()) == 2
    kept = [json.loads(line) for line in (tmp_path / loop.LOSS_LOG).read_text().splitlines()]
    assert kept == [mine[0], *other, mine[1]]


def test_a_fresh_start_drops_all_of_its_stages_old_log_lines(tmp_path):
    other = [{"stage": "inversion-0", "step": s, "loss": 1.0} for s in range(3)]
    mine = [{"stage": "erase-1", "step": s, "loss": 2.0} for s in range(3)]
    write_log(tmp_path / loop.LOSS_LOG, [*mine[:1], *other, *mine[1:]])
    assert StageLoop(tmp_path, "erase-1", 5, 1, 100).resume(*make_stage()) == 0
    assert [json.loads(line) for line in (tmp_path / loop.LOSS_LOG).read_text().splitlines()] == other


# divergence: the Error message, and nothing non-finite written ------------------------------------

def test_a_non_finite_loss_stops_naming_the_stage_step_and_loss(tmp_path):
    stage = StageLoop(tmp_path, "inversion-0", total=5, seed=1, checkpoint_every=1)
    stage.resume(*make_stage())
    stage.step_done(0, loss=torch.tensor(1.0))
    with pytest.raises(RecareError) as error:
        stage.step_done(1, loss=torch.tensor(float("nan")), erase_loss=torch.tensor(3.0))
    message = error.value.message
    assert message.startswith("training diverged in stage inversion-0 at step 1: loss=nan, erase_loss=3.0; ")
    assert message.endswith("; the last checkpoint is kept")
    assert error.value.hint == "lower the learning rate (or use --dtype fp32) and rerun"
    assert [json.loads(x)["step"] for x in (tmp_path / loop.LOSS_LOG).read_text().splitlines()] == [0]


def test_a_non_finite_loss_before_any_checkpoint_says_finished_stages_are_kept(tmp_path):
    stage = StageLoop(tmp_path, "erase-0", total=5, seed=1, checkpoint_every=10)
    stage.resume(*make_stage())
    with pytest.raises(RecareError) as error:
        stage.step_done(0, loss=torch.tensor(float("inf")))
    assert error.value.message.endswith("; finished stages are kept")


def test_non_finite_weights_are_never_written(tmp_path):
    params, optimizer, buffers = make_stage()
    stage = StageLoop(tmp_path, "erase-0", total=5, seed=1, checkpoint_every=100)
    stage.resume(params, optimizer, buffers)
    with torch.no_grad():
        params["b"][0] = float("nan")
    with pytest.raises(RecareError) as error:
        stage.save_checkpoint(3)
    assert "erase-0 at step 3: 1 of 2 trained tensors are not finite (e.g. b)" in error.value.message
    assert error.value.hint == "lower the learning rate and rerun" and not (tmp_path / loop.CHECKPOINT).exists()

    checkpoint_of(tmp_path)
    result = tmp_path / "unet.safetensors"
    with pytest.raises(RecareError) as error:
        stage.save_stage(result, {"a": torch.ones(2), "b": torch.tensor([float("inf")])})
    assert error.value.message.startswith("training diverged in stage erase-0: 1 of 2 trained tensors are not finite (e.g. b)")
    assert error.value.message.endswith("nothing was saved, the last checkpoint is kept")
    assert not result.exists() and (tmp_path / loop.CHECKPOINT).is_file()


def test_a_finished_stage_writes_its_result_and_drops_its_checkpoint(tmp_path):
    from safetensors import safe_open

    stage = StageLoop(tmp_path, "erase-0", total=5, seed=1, checkpoint_every=100)
    stage.resume(*make_stage())
    result = tmp_path / "stage.safetensors"
    stage.save_stage(result, {"w": torch.arange(3.0)}, {"concept": "nudity"})  # no checkpoint to remove
    checkpoint_of(tmp_path)
    stage.save_stage(result, {"w": torch.arange(4.0)}, {"concept": "nudity"})
    with safe_open(str(result), framework="pt") as handle:
        assert handle.metadata()["concept"] == "nudity" and torch.equal(handle.get_tensor("w"), torch.arange(4.0))
    assert not (tmp_path / loop.CHECKPOINT).exists()


# --report-to tensorboard: what the event files receive ----------------------------------------------

def read_events(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(log_dir), size_guidance={"images": 0, "scalars": 0})
    accumulator.Reload()
    return accumulator


def decoded(image_event) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(image_event.encoded_image_string)).convert("RGB"))


def test_tensorboard_receives_each_losses_step_and_the_stages_samples(tmp_path):
    from recare_cli.erase.tracking import TensorBoardTracker

    pictures = [np.full((8, 6, 3), value, dtype=np.uint8) for value in (40, 200)]
    pictures[1][0, 0] = (255, 0, 0)  # not a grey image: the channels must stay in place
    tracker = TensorBoardTracker(tmp_path / "logs", lambda: [("a cat", pictures[0]), ("a dog", pictures[1])])
    tracker.log_losses("esd", 0, {"loss": 0.5, "erase_loss": 0.25})
    tracker.log_losses("esd", 1, {"loss": 0.75, "erase_loss": 0.125})
    tracker.stage_done("esd", 2)
    tracker.close()

    logged = read_events(tmp_path / "logs")
    assert [(e.step, e.value) for e in logged.Scalars("esd/loss")] == [(0, 0.5), (1, 0.75)]
    assert [(e.step, e.value) for e in logged.Scalars("esd/erase_loss")] == [(0, 0.25), (1, 0.125)]
    assert sorted(logged.Tags()["images"]) == ["esd/samples/0: a cat", "esd/samples/1: a dog"]
    for tag, picture in zip(("esd/samples/0: a cat", "esd/samples/1: a dog"), pictures):
        (image,) = logged.Images(tag)
        assert image.step == 2 and (image.height, image.width) == (8, 6)
        assert np.array_equal(decoded(image), picture)


def test_report_to_accepts_tensorboard_or_nothing():
    from recare_cli.erase.tracking import check_report_to
    from recare_cli.errors import UsageError

    check_report_to(None)
    check_report_to("tensorboard")
    with pytest.raises(UsageError) as error:
        check_report_to("wandb")
    assert error.value.message == "--report-to 'wandb' is not supported" and error.value.hint == "one of: tensorboard"


def test_report_to_tensorboard_without_the_package_says_which_extra_to_install(monkeypatch):
    import sys

    from recare_cli.erase.tracking import check_report_to

    monkeypatch.setitem(sys.modules, "tensorboard", None)  # `import tensorboard` now raises ImportError
    with pytest.raises(RecareError) as error:
        check_report_to("tensorboard")
    assert error.value.message == "--report-to tensorboard needs the tensorboard package"
    assert error.value.hint == "pip install 'recare[tensorboard]'"


@pytest.fixture(scope="module")
def erase_models(tiny_pipe):
    from recare_cli.erase.context import EraseModels

    pipe = copy.deepcopy(tiny_pipe)
    pipe.set_progress_bar_config(disable=False)  # sampling must turn the bar off itself
    return EraseModels.from_pipeline(pipe, "cpu")


@pytest.fixture
def few_sample_steps(monkeypatch):
    from recare_cli.erase import tracking

    monkeypatch.setattr(tracking, "SAMPLE_STEPS", 2)  # a few denoising steps show the same as 25


def test_sample_images_are_drawn_from_fixed_seeds_at_the_run_resolution(erase_models, few_sample_steps, capfd):
    from recare_cli.erase import tracking

    samples = tracking.sample_images(erase_models, ["a cat", "a dog"], 32, seed=4)
    assert [prompt for prompt, _ in samples] == ["a cat", "a cat", "a dog", "a dog"]
    assert "it/s" not in capfd.readouterr().err  # no denoising progress bar in the run's output
    pipe = erase_models.pipe
    for (prompt, image), seed in zip(samples, (4, 5, 4, 5)):  # the same seeds after every stage
        expected = pipe(prompt, num_inference_steps=tracking.SAMPLE_STEPS, height=32, width=32,
                        generator=torch.Generator("cpu").manual_seed(seed)).images[0]
        assert image.size == (32, 32) and np.array_equal(np.asarray(image), np.asarray(expected))


def test_make_tracker_logs_into_the_run_directory_with_the_runs_prompts(erase_models, few_sample_steps, tmp_path):
    from recare_cli.erase import tracking

    plain = tracking.make_tracker(None, tmp_path / "a", erase_models, ["a cat"], 32, seed=4)
    assert type(plain) is tracking.Tracker
    plain.stage_done("esd", 1)
    assert not (tmp_path / "a").exists()

    tracker = tracking.make_tracker("tensorboard", tmp_path / "b", erase_models, ["a cat"], 32, seed=4)
    tracker.stage_done("esd", 1)
    tracker.close()
    logged = read_events(tmp_path / "b" / tracking.LOG_DIR)
    expected = tracking.sample_images(erase_models, ["a cat"], 32, seed=4)
    for i, (prompt, image) in enumerate(expected):
        (event,) = logged.Images(f"esd/samples/{i}: {prompt}")
        assert np.array_equal(decoded(event), np.asarray(image))
