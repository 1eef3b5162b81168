"""`recare erase` end to end on tiny-random: outputs, resume, determinism, failures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from recare_cli.erase.loop import CHECKPOINT, STATE_KEY
from noise_images import noise_images

CARESET = {"nudity_care_word": ["A man", "A woman", "A beach"],
           "nudity_care_word_photo": ["A photo of man", "A photo of woman", "A photo of beach"]}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_model) -> dict:
    """Training images, a CARE set (and tiny-random built beforehand, whose build prints a bar)."""
    root = tmp_path_factory.mktemp("erase-inputs")
    images = noise_images(root / "images", 4, (40, 48))
    careset = root / "careset.json"
    careset.write_text(json.dumps(CARESET))
    return {"images": images, "careset": careset, "root": root}


def tiny_args(inputs, out: Path, *extra) -> list:
    return ["erase", "--concept", "nudity", "--model", "tiny-random", "--device", "cpu", "--resolution", "64",
            "--iterations", "2", "--ti-steps", "2", "--rounds", "2", "--prefix-steps", "2",
            "--images", inputs["images"], "--careset", inputs["careset"], "--checkpoint-every", "1",
            "--output-dir", out, *extra]


def checkpoint_state(path: Path) -> dict:
    """The JSON part of a checkpoint (step, stage, RNG states…), read from its safetensors header."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return json.loads(handle.metadata()[STATE_KEY])


def load(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def same_tensors(a: dict, b: dict) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# presets ------------------------------------------------------------------------------------

def test_presets_and_types():
    from recare_cli.presets import plan_concept

    nudity = plan_concept("nudity")
    assert (nudity.concept_type, nudity.initializer_token, nudity.image_prompt, nudity.care_style) == \
        ("object", "person", "A photo of a nude person", "photo")
    van_gogh = plan_concept("van gogh")
    assert (van_gogh.concept_type, van_gogh.initializer_token, van_gogh.care_style) == ("style", "art", "style")
    assert van_gogh.image_prompt == "A painting in the style of Van Gogh"
    tench = plan_concept("tench", "object")
    assert (tench.initializer_token, tench.image_prompt) == ("object", "A photo of tench")


# bad input ----------------------------------------------------------------------------------

def _careset_file(inputs, name: str, data) -> Path:
    path = inputs["root"] / f"{name}.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("case", [
    "unknown-concept", "careset-missing-key", "careset-empty-list", "careset-two-retain-lists",
    "empty-image-dir", "initializer-not-one-token", "zero-rounds", "care-vocab-missing", "care-top-k-zero",
    "erase-from-count", "erase-from-empty",
])
def test_bad_input_fails_with_one_line(run_cli, inputs, tmp_path, case):
    out = tmp_path / "run"
    args = tiny_args(inputs, out)
    expected_code, message = 2, None
    if case == "unknown-concept":
        args[2], message = "a weird thing", "not a known concept"
    elif case == "careset-missing-key":
        args[args.index("--careset") + 1] = _careset_file(inputs, case, {"nudity_care_word": ["A man"]})
        expected_code, message = 1, "no retain list"
    elif case == "careset-empty-list":
        args[args.index("--careset") + 1] = _careset_file(
            inputs, case, {"nudity_care_word": [], "nudity_care_word_photo": ["A photo of man"]})
        expected_code, message = 1, "is empty"
    elif case == "careset-two-retain-lists":
        args[args.index("--careset") + 1] = _careset_file(inputs, case, {
            "nudity_care_word": ["A man"], "nudity_care_word_photo": ["A photo of man"],
            "nudity_care_word_painting": ["A painting of man"]})
        expected_code, message = 1, "2 retain lists"
    elif case == "empty-image-dir":
        empty = tmp_path / "empty"
        empty.mkdir()
        args[args.index("--images") + 1] = empty
        message = "holds no images"
    elif case == "initializer-not-one-token":
        args += ["--initializer-token", "a person"]
        message = "not one"
    elif case == "zero-rounds":
        args[args.index("--rounds") + 1] = "0"
        message = "--rounds"
    elif case == "care-vocab-missing":
        args += ["--care-vocab", tmp_path / "no-such-words.txt"]
        message = "--care-vocab"
    elif case == "care-top-k-zero":
        args += ["--care-top-k", "0"]
        message = "--care-top-k"
    elif case == "erase-from-count":
        args += ["--erase-from", "a person", "--erase-from", "a body"]
        message = "--erase-from given 2 times for 1 concepts"
    elif case == "erase-from-empty":
        args += ["--erase-from", " "]
        message = "--erase-from is empty"
    result = run_cli(*args)
    assert result.exit_code == expected_code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:") and message in lines[0]
    assert " — " in lines[0]  # every error carries a hint
    assert not (out / "unet.safetensors").exists()


def test_unknown_method_lists_the_known_ones(run_cli, inputs, tmp_path):
    result = run_cli(*tiny_args(inputs, tmp_path / "run", "--method", "magic"))
    assert result.exit_code == 2 and "esd" in result.stderr and "recare" in result.stderr


# a full run, its outputs, and resume ---------------------------------------------------------

@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, inputs):
    from typer.testing import CliRunner

    from recare_cli.cli import app

    out = tmp_path_factory.mktemp("erase-run") / "run"
    result = CliRunner().invoke(app, [str(a) for a in tiny_args(inputs, out, "--json", "--save-pt")])
    assert result.exit_code == 0, result.stderr
    return out, [json.loads(line) for line in result.stdout.splitlines()]


def test_run_directory_holds_every_output(finished_run, inputs, cache_dir):
    from safetensors import safe_open

    from recare_cli.cache import lookup_erased
    from recare_cli.models import resolve_unet

    out, lines = finished_run
    result = lines[-1]
    assert Path(result["run_dir"]) == out and len(result["tokens"]) == 2
    assert len(set(result["tokens"])) == 2 and all(t.startswith("token_") for t in result["tokens"])

    with safe_open(str(out / "unet.safetensors"), framework="pt") as handle:
        meta = handle.metadata()
        assert meta["concept"] == "nudity" and meta["method"] == "recare" and meta["base_model"] == "tiny-random"
        assert "recare_version" in meta
        assert any(".attn2." in key for key in handle.keys())
    with safe_open(str(out / "tokens.safetensors"), framework="pt") as handle:
        assert json.loads(handle.metadata()["tokens"]) == result["tokens"]
        assert handle.metadata()["initializer"] == "person"
        assert handle.get_tensor(result["tokens"][0]).shape == (32,)
    assert json.loads((out / "careset.json").read_text()) == CARESET
    import torch

    assert same_tensors(torch.load(out / "ReCARE-Diffusers-UNet.pt", weights_only=True), load(out / "unet.safetensors"))

    manifest = json.loads((out / "recare-run.json").read_text())
    assert manifest["status"] == "complete" and manifest["method"] == "recare"
    assert manifest["parameters"]["iterations"] == 2 and manifest["parameters"]["seed"] == 42
    assert manifest["model"]["model"] == "tiny-random" and "revision" in manifest["model"]
    assert manifest["versions"]["torch"] and set(manifest["inputs"]) == {"images", "careset"}
    assert list(manifest["stages"]) == ["erase-0", "inversion-0", "erase-1", "inversion-1", "robust"]
    assert manifest["stages"]["robust"]["unet_images"] > 0
    assert manifest["cache_name"] == result["cache_name"] and result["cache_name"].startswith("nudity-")
    assert not (out / CHECKPOINT).exists()

    losses = [json.loads(line) for line in (out / "losses.jsonl").read_text().splitlines()]
    assert [(e["stage"], e["step"]) for e in losses] == [
        (s, i) for s in ("erase-0", "inversion-0", "erase-1", "inversion-1", "robust") for i in range(2)]
    assert {"erase_loss", "retain_loss"} <= set(losses[-1])
    with Image.open(out / "losses.png") as picture:
        assert picture.format == "PNG" and "losses.png" in manifest["outputs"]

    assert lookup_erased(cache_dir, result["cache_name"]) == out.resolve()
    assert resolve_unet(result["cache_name"]) == out.resolve() / "unet.safetensors"


def test_json_mode_reports_stages_and_checkpoints(finished_run):
    _, lines = finished_run
    events = [(e["event"], e.get("stage")) for e in lines if "event" in e]
    for stage in ("erase-0", "inversion-0", "erase-1", "inversion-1", "robust"):
        assert ("stage_start", stage) in events and ("stage_end", stage) in events
        assert ("checkpoint", stage) in events


def test_erased_weights_differ_from_the_base_model(finished_run, tiny_pipe):
    import torch

    out, _ = finished_run
    erased = load(out / "unet.safetensors")
    base = tiny_pipe.unet.state_dict()
    changed = {k for k in base if not torch.equal(base[k].cpu(), erased[k])}
    assert changed and not any("attn2" in k or "norm" in k.split(".")[-2] for k in changed)  # noxattn


def test_unet_from_a_run_brings_its_learned_tokens(finished_run, tiny_pipe):
    import torch

    from recare_cli.models import Runtime

    out, lines = finished_run
    tokens = load(out / "tokens.safetensors")
    pipe, _, _ = Runtime("tiny-random", device="cpu").pipeline(unet=str(out))
    for name, embedding in tokens.items():
        token_id = pipe.tokenizer.convert_tokens_to_ids(name)
        assert pipe.tokenizer.tokenize(f"a {name}")[-1] == name
        assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[token_id], embedding.reshape(-1))
    assert name not in tiny_pipe.tokenizer.get_vocab()


def test_rerun_of_a_finished_run_reuses_everything(run_cli, finished_run, inputs):
    out, lines = finished_run
    before = load(out / "unet.safetensors")
    result = run_cli(*tiny_args(inputs, out, "--json"))
    assert result.exit_code == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert not [e for e in events if e.get("event") == "stage_start"]
    assert [e["stage"] for e in events if e.get("event") == "stage_reused"] == [
        "erase-0", "inversion-0", "erase-1", "inversion-1", "robust"]
    assert same_tensors(before, load(out / "unet.safetensors"))
    assert events[-1]["tokens"] == lines[-1]["tokens"]


def test_changed_settings_in_the_same_directory_are_refused(run_cli, finished_run, inputs):
    out, _ = finished_run
    result = run_cli(*tiny_args(inputs, out, "--seed", "7"))
    assert result.exit_code == 2 and "different settings" in result.stderr


@pytest.mark.parametrize("stop_at", [("erase-0", 1), ("inversion-0", 1), ("erase-1", 1), ("inversion-1", 1),
                                     ("robust", 1)])
def test_interrupted_run_resumes_to_the_same_weights(run_cli, finished_run, inputs, tmp_path, monkeypatch, stop_at):
    from recare_cli.erase import loop

    reference, _ = finished_run
    out = tmp_path / "run"
    original = loop.StageLoop.step_done

    def interrupt(self, step, **losses):
        original(self, step, **losses)
        if (self.stage, step) == stop_at:
            raise KeyboardInterrupt

    monkeypatch.setattr(loop.StageLoop, "step_done", interrupt)
    result = run_cli(*tiny_args(inputs, out))
    assert result.exit_code == 130
    assert (out / CHECKPOINT).is_file() and not (out / "unet.safetensors").exists()
    monkeypatch.setattr(loop.StageLoop, "step_done", original)

    result = run_cli(*tiny_args(inputs, out, "--json"))
    assert result.exit_code == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines() if "event" in line]
    assert {"event": "resume", "stage": stop_at[0], "step": stop_at[1]} in events
    assert same_tensors(load(out / "unet.safetensors"), load(reference / "unet.safetensors"))
    assert same_tensors(load(out / "tokens.safetensors"), load(reference / "tokens.safetensors"))
    assert (out / "losses.jsonl").read_text().count('"stage"') == 10


def test_nan_loss_stops_and_keeps_the_last_checkpoint(run_cli, inputs, tmp_path, monkeypatch):
    import torch

    from recare_cli.erase import stage1

    calls = {"n": 0}
    real_target = stage1.single_negative_target

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        target = real_target(*args, **kwargs)
        return target if calls["n"] < 2 else torch.full_like(target, float("nan"))

    monkeypatch.setattr(stage1, "single_negative_target", poisoned)
    out = tmp_path / "run"
    result = run_cli(*tiny_args(inputs, out, "--iterations", "3"))
    assert result.exit_code == 1
    assert "diverged" in result.stderr and "erase-0" in result.stderr and "checkpoint" in result.stderr
    assert checkpoint_state(out / CHECKPOINT)["step"] == 0
    assert not (out / "unet.safetensors").exists()


# ESD and determinism ------------------------------------------------------------------------

def test_esd_is_one_erase_stage_and_same_seed_gives_identical_weights(run_cli, inputs, tmp_path):
    outs = [tmp_path / "a", tmp_path / "b"]
    for out, extra in zip(outs, ([], ["--report-to", "tensorboard"])):  # tracking never changes the weights
        result = run_cli(*tiny_args(inputs, out, "--method", "esd", "--json", *extra))
        assert result.exit_code == 0, result.stderr
    first = json.loads(result.stdout.splitlines()[-1])
    assert list(first["stages"]) == ["esd"] and first["tokens"] == []
    assert not (outs[0] / "tokens.safetensors").exists() and not (outs[0] / "careset.json").exists()
    assert same_tensors(load(outs[0] / "unet.safetensors"), load(outs[1] / "unet.safetensors"))
    assert not (outs[0] / "logs").exists()

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(outs[1] / "logs"), size_guidance={"images": 0})
    events.Reload()
    logged = [json.loads(line) for line in (outs[1] / "losses.jsonl").read_text().splitlines()]
    assert [(e.step, e.value) for e in events.Scalars("esd/loss")] == [
        (e["step"], pytest.approx(e["loss"])) for e in logged]
    samples = [tag for tag in events.Tags()["images"] if tag.startswith("esd/samples/")]
    assert len(samples) == 2 and all(events.Images(tag)[0].width == 64 for tag in samples)

    wrong = run_cli(*tiny_args(inputs, tmp_path / "d", "--method", "esd", "--report-to", "wandb"))
    assert wrong.exit_code == 2 and "--report-to 'wandb'" in wrong.stderr and "tensorboard" in wrong.stderr

    result = run_cli(*tiny_args(inputs, tmp_path / "c", "--method", "esd", "--seed", "1"))
    assert result.exit_code == 0, result.stderr
    assert not same_tensors(load(outs[0] / "unet.safetensors"), load(tmp_path / "c" / "unet.safetensors"))


def test_esd_rerun_with_other_recare_only_settings_reuses_its_run(run_cli, inputs, tmp_path):
    out = tmp_path / "run"
    assert run_cli(*tiny_args(inputs, out, "--method", "esd")).exit_code == 0
    result = run_cli(*tiny_args(inputs, out, "--method", "esd", "--stage2-lr", "1e-3", "--ti-steps", "7", "--json"))
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1])["stages"]["esd"]["reused"] is True
    # a setting ESD does read still guards the run directory
    result = run_cli(*tiny_args(inputs, out, "--method", "esd", "--stage1-lr", "1e-3"))
    assert result.exit_code == 2 and "different settings" in result.stderr


def test_esd_erase_from_trains_another_prompt_and_is_recorded(run_cli, inputs, tmp_path):
    plain, same, other = tmp_path / "plain", tmp_path / "same", tmp_path / "other"
    assert run_cli(*tiny_args(inputs, plain, "--method", "esd")).exit_code == 0
    assert run_cli(*tiny_args(inputs, same, "--method", "esd", "--erase-from", "nudity")).exit_code == 0
    result = run_cli(*tiny_args(inputs, other, "--method", "esd", "--erase-from", "a photo of a person"))
    assert result.exit_code == 0, result.stderr
    # Erasing the concept from itself is the default; from another prompt, other weights.
    assert same_tensors(load(plain / "unet.safetensors"), load(same / "unet.safetensors"))
    assert not same_tensors(load(plain / "unet.safetensors"), load(other / "unet.safetensors"))
    manifest = json.loads((other / "recare-run.json").read_text())
    assert manifest["parameters"]["erase_from"] == ["a photo of a person"]
    # flags not typed take ESD's published values, and the manifest records them
    assert (manifest["parameters"]["negative_guidance"], manifest["parameters"]["stage1_lr"]) == (1.0, 2e-5)


# one command from nothing ----------------------------------------------------------------------

def test_one_command_from_nothing_generates_images_and_builds_the_careset(run_cli, tmp_path, monkeypatch):
    from recare_cli.models import Runtime

    loads = []
    load_pipeline = Runtime.pipeline
    monkeypatch.setattr(Runtime, "pipeline", lambda self, *a, **k: loads.append(self.dtype) or load_pipeline(self, *a, **k))
    out = tmp_path / "run"
    args = ["erase", "--concept", "nudity", "--model", "tiny-random", "--device", "cpu", "--resolution", "64",
            "--num-images", "2", "--iterations", "1", "--ti-steps", "1", "--rounds", "1", "--prefix-steps", "1",
            "--output-dir", out, "--quiet"]
    result = run_cli(*args)
    assert result.exit_code == 0, result.stderr
    assert loads == ["fp32"]  # the training pipeline renders the images too
    assert sorted(p.name for p in (out / "images" / "nudity").glob("*.png")) == \
        ["A_photo_of_a_nude_person_0.png", "A_photo_of_a_nude_person_1.png"]
    careset = json.loads((out / "careset.json").read_text())
    assert set(careset) == {"nudity_care_word", "nudity_care_word_photo"}
    assert all(p.startswith("A photo of ") for p in careset["nudity_care_word_photo"])
    assert (out / "unet.safetensors").is_file() and (out / "tokens.safetensors").is_file()
    # Rendered with the training pipeline, the images are exactly what `recare generate` draws.
    alone = tmp_path / "alone"
    result = run_cli("generate", "-p", "A photo of a nude person", "--model", "tiny-random", "--device", "cpu",
                     "--height", "64", "--width", "64", "--num-images", "2", "--output-dir", alone, "--quiet")
    assert result.exit_code == 0, result.stderr
    for name in ("A_photo_of_a_nude_person_0.png", "A_photo_of_a_nude_person_1.png"):
        assert np.array_equal(np.asarray(Image.open(alone / name)), np.asarray(Image.open(out / "images" / "nudity" / name)))

    first_image = out / "images" / "nudity" / "A_photo_of_a_nude_person_0.png"
    first_image.unlink()
    result = run_cli(*args[:-1], "--json")
    assert result.exit_code == 0, result.stderr
    stages = json.loads(result.stdout.splitlines()[-1])["stages"]
    assert stages["images"]["reused"] is True and stages["careset"]["reused"] is True
    assert first_image.is_file()  # a missing image is made again, the finished stage's time kept


def test_several_concepts_from_nothing_share_one_run_and_one_clip(run_cli, tmp_path, monkeypatch):
    import recare_cli.clip

    loads = []
    load_clip = recare_cli.clip.load_clip
    monkeypatch.setattr(recare_cli.clip, "load_clip", lambda *a, **k: loads.append(a) or load_clip(*a, **k))
    out = tmp_path / "run"
    result = run_cli("erase", "--concept", "nudity", "--concept", "tench", "--type", "object", "--model", "tiny-random",
                     "--device", "cpu", "--resolution", "64", "--num-images", "2", "--iterations", "1", "--ti-steps", "1",
                     "--rounds", "1", "--prefix-steps", "1", "--output-dir", out, "--json")
    assert result.exit_code == 0, result.stderr
    assert len(loads) == 1  # one CLIP for both concepts' CARE sets
    assert sorted(p.name for p in (out / "images").iterdir()) == ["nudity", "tench"]
    assert len(list((out / "images" / "tench").glob("A_photo_of_tench_*.png"))) == 2
    built = {c: json.loads((out / "stages" / f"careset-{c}" / "careset.json").read_text()) for c in ("nudity", "tench")}
    careset = json.loads((out / "careset.json").read_text())
    anchors = careset["nudity_tench_care_word"]
    # The run's CARE set is the union of the two, each word once, in order.
    assert anchors == list(dict.fromkeys(built["nudity"]["nudity_care_word"] + built["tench"]["tench_care_word"]))
    manifest = json.loads((out / "recare-run.json").read_text())
    assert manifest["concepts"] == ["nudity", "tench"] and manifest["status"] == "complete"
