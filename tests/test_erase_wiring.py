"""run_erase's wiring: which setting reaches which stage, what each stage starts from, what is
written where, and which finished stages a rerun reuses. Spies record each stage's arguments and
then run the real stage, on tiny-random with one step a stage."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import time
from pathlib import Path

import pytest
import torch

from test_erase_cli import CARESET, inputs, load, same_tensors  # noqa: F401 - `inputs` is a fixture

# Every setting away from its default and from every other one, so a setting passed to the wrong
# place (or not at all) shows.
SETTINGS = dict(train_method="xattn", iterations=1, stage1_lr=3e-5, stage2_lr=4e-5, ti_lr=6e-3, ti_steps=2,
                negative_guidance=1.5, compositional_guidance_scale=2.5, apg_eta=0.7, apg_norm_threshold=0.3,
                apg_momentum=0.2, resolution=64, prefix_steps=2, center_crop=True, seed=7, rounds=2,
                num_adv_concepts=1, checkpoint_every=5)


class Spy:
    """Records each stage's arguments (and what its trained weights and token row were on entry)."""

    def __init__(self):
        self.calls: list[dict] = []

    def install(self, monkeypatch):
        from recare_cli.erase import inversion, stage1, stage2, tracking

        real_erase, real_inversion, real_robust = stage1.erase_stage, inversion.inversion_stage, stage2.robust_erase_stage

        def erase_stage(models, trainable, targets, settings, loop, erase_from=None):
            self._record("erase", models, trainable, loop, targets=list(targets), settings=settings, erase_from=erase_from)
            real_erase(models, trainable, targets, settings, loop, erase_from)
            self.calls[-1]["exit"] = _clone(trainable)

        def inversion_stage(models, token_id, images, templates, token, settings, loop):
            row = torch.cat([e.get_input_embeddings().weight[token_id].detach().clone() for e, _ in models.text_encoders])
            self._record("inversion", models, {}, loop, token_id=token_id, images=list(images), templates=templates,
                         token=token, settings=settings, row=row,
                         vocab_id=models.tokenizer.convert_tokens_to_ids(token), unet=_clone(models.unet.state_dict()))
            learned = real_inversion(models, token_id, images, templates, token, settings, loop)
            self.calls[-1]["learned"] = learned.clone()
            return learned

        def robust_erase_stage(models, trainable, erase_list, anchors, retains, settings, loop):
            self._record("robust", models, trainable, loop, erase_list=list(erase_list), anchors=list(anchors),
                         retains=list(retains), settings=settings)
            real_robust(models, trainable, erase_list, anchors, retains, settings, loop)
            self.calls[-1]["exit"] = _clone(trainable)

        def make_tracker(*args):
            self.tracker_args = args
            self.tracker = real_tracker(*args)
            return self.tracker

        real_tracker = tracking.make_tracker
        monkeypatch.setattr(tracking, "make_tracker", make_tracker)
        monkeypatch.setattr(stage1, "erase_stage", erase_stage)
        monkeypatch.setattr(inversion, "inversion_stage", inversion_stage)
        monkeypatch.setattr(stage2, "robust_erase_stage", robust_erase_stage)
        return self

    def _record(self, kind, models, trainable, loop, **seen):
        self.models = models
        self.calls.append({"kind": kind, "stage": loop.stage, "total": loop.total, "seed": loop.seed,
                           "checkpoint_every": loop.checkpoint_every, "run_dir": loop.run_dir,
                           "reporter": loop.reporter, "task": loop.task, "tracker": loop.tracker,
                           "entry": _clone(trainable), **seen})

    def stage(self, name: str) -> dict:
        (call,) = [c for c in self.calls if c["stage"] == name]
        return call


def _clone(params: dict) -> dict:
    return {k: v.detach().clone() for k, v in params.items()}


def _request(inputs, out: Path, **changes):
    from recare_cli.erase.request import EraseRequest

    given = {"concepts": ["nudity"], "images": inputs["images"], "careset": inputs["careset"], "output_dir": out}
    return EraseRequest(**{**given, **SETTINGS, **changes})


def _run(request, spy=None):
    from recare_cli.erase.run import run_erase
    from recare_cli.models import Runtime
    from recare_cli.output import JSON, Reporter

    stdout = io.StringIO()
    reporter = Reporter(JSON, stdout=stdout)
    if spy is not None:
        spy.reporter = reporter
    result = run_erase(request, Runtime("tiny-random", device="cpu"), reporter)
    return result, [json.loads(line) for line in stdout.getvalue().splitlines()]


@pytest.fixture(scope="module")
def wired(tmp_path_factory, inputs):  # noqa: F811 - the imported fixture
    out = tmp_path_factory.mktemp("wired") / "run"
    out.mkdir()
    (out / ".keep").write_text("")  # a hidden file: the folder still counts as empty, and is no output
    with pytest.MonkeyPatch.context() as monkeypatch:
        spy = Spy().install(monkeypatch)
        started = time.perf_counter()
        result, events = _run(_request(inputs, out, command="recare erase --concept nudity"), spy)
        spy.seconds = time.perf_counter() - started
    return out, spy, result, events


def _knobs():
    from recare_cli.erase.guidance import GuidanceKnobs

    return GuidanceKnobs(eta=SETTINGS["apg_eta"], norm_threshold=SETTINGS["apg_norm_threshold"],
                         momentum=SETTINGS["apg_momentum"])


def test_each_stage_gets_its_own_settings(wired, tiny_pipe):
    from recare_cli.erase.inversion import InversionSettings
    from recare_cli.presets import plan_concept
    from recare_cli.erase.params import select_trainable
    from recare_cli.erase.stage1 import EraseSettings

    out, spy, _, _ = wired
    assert [c["stage"] for c in spy.calls] == ["erase-0", "inversion-0", "erase-1", "inversion-1", "robust"]
    stage1 = EraseSettings(iterations=1, lr=3e-5, guidance_scale=1.5, resolution=64, prefix_steps=2, knobs=_knobs())
    stage2 = EraseSettings(iterations=1, lr=4e-5, guidance_scale=2.5, resolution=64, prefix_steps=2, knobs=_knobs())
    inversion = InversionSettings(steps=2, lr=6e-3, resolution=64, center_crop=True)
    assert spy.stage("erase-0")["settings"] == spy.stage("erase-1")["settings"] == stage1
    assert spy.stage("inversion-0")["settings"] == spy.stage("inversion-1")["settings"] == inversion
    assert spy.stage("robust")["settings"] == stage2

    for call in spy.calls:  # each stage's loop: its own name and length, the run's seed and checkpoints
        assert call["total"] == (2 if call["kind"] == "inversion" else 1)
        assert (call["seed"], call["checkpoint_every"], call["run_dir"]) == (7, 5, out)
    # one tracker for the run, told the image prompt, resolution and seed; every loop reports to the run's reporter
    assert spy.tracker_args[1:] == (out, spy.models, [plan_concept("nudity").image_prompt], 64, 7)
    assert spy.tracker_args[0] is None  # no --report-to
    assert all(c["tracker"] is spy.tracker and c["reporter"] is spy.reporter and c["task"] is not None for c in spy.calls)
    xattn = set(select_trainable(copy.deepcopy(tiny_pipe.unet), "xattn"))
    assert all(set(c["entry"]) == xattn for c in spy.calls if c["kind"] != "inversion")


def test_rounds_chain_erase_then_invert_and_stage2_gets_the_first_tokens(wired, tiny_pipe, inputs):  # noqa: F811
    from recare_cli.erase.inversion import initializer_id, new_token_name
    from recare_cli.fsutil import list_images
    from recare_cli.presets import plan_concept

    _, spy, result, _ = wired
    plan = plan_concept("nudity")
    base = tiny_pipe.unet.state_dict()
    images = sorted(list_images(inputs["images"]))
    assert len(images) == 4
    initializer_row = tiny_pipe.text_encoder.get_input_embeddings().weight[
        initializer_id(tiny_pipe.tokenizer, plan.initializer_token)]
    vocab = set(tiny_pipe.tokenizer.get_vocab())

    tokens = []
    for r in range(2):
        erase, inversion = spy.stage(f"erase-{r}"), spy.stage(f"inversion-{r}")
        # round 0 erases the concept from the original weights; round 1 the last token, from round 0's weights
        assert erase["targets"] == (["nudity"] if r == 0 else [tokens[-1]])
        start = base if r == 0 else spy.stage("erase-0")["exit"]
        assert all(torch.equal(v, start[k]) for k, v in erase["entry"].items())
        # the inversion: a fresh token named from the seed, starting at the initializer's row, on this
        # round's half of the sorted images, with the concept type's templates
        assert inversion["token"] == new_token_name(7, r, vocab | set(tokens))
        assert inversion["vocab_id"] == inversion["token_id"]
        assert torch.equal(inversion["row"], initializer_row)
        assert inversion["images"] == images[2 * r: 2 * r + 2]
        assert inversion["templates"] == plan.templates
        assert all(torch.equal(inversion["unet"][k], v) for k, v in erase["exit"].items())  # the erased UNet
        tokens.append(inversion["token"])
    assert len(set(tokens)) == 2 and result.tokens == tokens

    robust = spy.stage("robust")
    assert robust["erase_list"] == ["nudity", tokens[0]]  # --num-adv-concepts 1 of the 2 tokens
    assert robust["anchors"] == CARESET["nudity_care_word"] and robust["retains"] == CARESET["nudity_care_word_photo"]
    assert all(torch.equal(v, base[k]) for k, v in robust["entry"].items())  # stage 2 starts from the original


def test_outputs_hold_the_final_weights_the_learned_tokens_and_the_record(wired, tiny_pipe, cache_dir):
    from safetensors import safe_open

    from recare_cli import __version__
    from recare_cli.cache import erased_dir
    from recare_cli.presets import plan_concept

    out, spy, result, events = wired
    robust = spy.stage("robust")
    tokens = [spy.stage(f"inversion-{r}")["token"] for r in range(2)]
    manifest = json.loads((out / "recare-run.json").read_text())

    unet = load(out / "unet.safetensors")  # stage 2's weights in the trained modules, the base model's elsewhere
    base = tiny_pipe.unet.state_dict()
    assert unet.keys() == base.keys()
    assert all(torch.equal(unet[k], robust["exit"][k] if k in robust["exit"] else base[k]) for k in base)
    with safe_open(str(out / "unet.safetensors"), framework="pt") as handle:
        assert handle.metadata() == {"concept": "nudity", "method": "recare", "base_model": "tiny-random",
                                     "base_revision": str(manifest["model"]["revision"]),
                                     "recare_version": __version__}
    learned = load(out / "tokens.safetensors")
    assert list(learned) == sorted(tokens)
    assert all(torch.equal(learned[t], spy.stage(f"inversion-{r}")["learned"]) for r, t in enumerate(tokens))
    with safe_open(str(out / "tokens.safetensors"), framework="pt") as handle:
        assert json.loads(handle.metadata()["tokens"]) == tokens and handle.metadata()["initializer"] == "person"
    assert not (out / "ReCARE-Diffusers-UNet.pt").exists()  # only with --save-pt

    assert (result.run_dir, result.unet_path, result.tokens) == (out, out / "unet.safetensors", tokens)
    assert manifest["status"] == "complete" and manifest["cache_name"] == result.cache_name
    assert manifest["outputs"] == sorted(manifest["outputs"]) and ".keep" not in manifest["outputs"]
    assert {"unet.safetensors", "tokens.safetensors", "careset.json", "stages", "losses.jsonl"} <= set(manifest["outputs"])
    assert sorted(p.name for p in (out / "stages").iterdir()) == sorted(f"{c['stage']}.safetensors" for c in spy.calls)
    assert manifest["seeds"] == {"python": 7, "numpy": 7, "torch": 7, "images": 7}
    assert manifest["command"] == "recare erase --concept nudity" and manifest["method"] == "recare"
    assert manifest["concepts"] == ["nudity"] and manifest["type"] == plan_concept("nudity").concept_type and manifest["dtype"] == "auto"
    entry = json.loads((erased_dir(cache_dir, result.cache_name) / "entry.json").read_text())
    assert entry["run_dir"] == str(out.resolve()) and entry["tokens"] == tokens and entry["concepts"] == ["nudity"]
    assert (entry["method"], entry["model"], entry["run_hash"]) == ("recare", "tiny-random", manifest["run_hash"])


def test_the_manifest_records_the_run_exactly(wired, inputs):  # noqa: F811
    from recare_cli.erase.request import input_hashes, parameters, run_hash, with_method_defaults
    from recare_cli.manifest import WRITTEN_BY
    from recare_cli.models import Runtime, library_versions
    from recare_cli.presets import plan_concept

    out, _, result, _ = wired
    manifest = json.loads((out / "recare-run.json").read_text())
    request = with_method_defaults(_request(inputs, out, command="recare erase --concept nudity"))
    runtime = Runtime("tiny-random", device="cpu")
    model, hashes = runtime.resolve().describe(), input_hashes(request)
    digest = run_hash(request, model, runtime.dtype, hashes)
    seed = request.seed
    assert {k: v for k, v in manifest.items() if k != "outputs"} == json.loads(json.dumps({
        "command": "recare erase --concept nudity", "method": "recare", "concepts": ["nudity"],
        "type": plan_concept("nudity").concept_type, "model": model, "dtype": runtime.dtype,
        "parameters": parameters(request), "seeds": {"python": seed, "numpy": seed, "torch": seed, "images": seed},
        "versions": library_versions(), "inputs": hashes, "run_hash": digest, "cache_name": f"nudity-{digest}",
        "status": "complete", "stages": result.stages, WRITTEN_BY: {"command": "erase", "run": digest},
    }, default=str))  # paths as the manifest writes them
    assert result.cache_name == f"nudity-{digest}" and out == result.run_dir


def test_each_stage_is_timed_counted_and_reported(wired):
    _, spy, result, events = wired
    names = ["erase-0", "inversion-0", "erase-1", "inversion-1", "robust"]
    assert list(result.stages) == names
    for name in names:
        entry = result.stages[name]
        assert entry["reused"] is False and isinstance(entry["seconds"], float)
        assert 0 < entry["seconds"] < spy.seconds
        assert entry["unet_images"] > 0
    assert result.stages["inversion-0"]["unet_images"] == 2  # one image a step, two steps
    starts = [(e["stage"], e["steps"]) for e in events if e.get("event") == "stage_start"]
    assert starts == [(n, 2 if n.startswith("inversion") else 1) for n in names]
    ends = {e["stage"]: e for e in events if e.get("event") == "stage_end"}
    assert all(ends[n] == {"event": "stage_end", "stage": n, **result.stages[n]} for n in names)


def test_a_rerun_reuses_finished_stages_and_redoes_the_rest_bit_for_bit(wired, inputs, tmp_path, monkeypatch):  # noqa: F811
    import shutil

    first, first_spy, first_result, _ = wired
    out = tmp_path / "run"
    shutil.copytree(first, out)
    for name in ("inversion-1", "robust"):
        (out / "stages" / f"{name}.safetensors").unlink()
    spy = Spy().install(monkeypatch)
    result, events = _run(_request(inputs, out, save_pt=True))  # --save-pt is no setting: the same run

    assert [c["stage"] for c in spy.calls] == ["inversion-1", "robust"]
    assert [e["stage"] for e in events if e.get("event") == "stage_reused"] == ["erase-0", "inversion-0", "erase-1"]
    # inversion-1 starts again from erase-1's weights, with a new row for a token of the same name
    inversion = spy.stage("inversion-1")
    assert all(torch.equal(inversion["unet"][k], v) for k, v in first_spy.stage("erase-1")["exit"].items())
    assert inversion["token"] == first_spy.stage("inversion-1")["token"]
    assert torch.equal(inversion["learned"], first_spy.stage("inversion-1")["learned"])
    # stage 2 gets the reused token and starts from the original weights, not erase-1's
    robust = spy.stage("robust")
    assert robust["erase_list"] == first_spy.stage("robust")["erase_list"]
    assert same_tensors(robust["entry"], first_spy.stage("robust")["entry"])
    assert result.tokens == first_result.tokens
    assert same_tensors(load(out / "unet.safetensors"), load(first / "unet.safetensors"))
    assert same_tensors(load(out / "tokens.safetensors"), load(first / "tokens.safetensors"))
    assert same_tensors(torch.load(out / "ReCARE-Diffusers-UNet.pt", weights_only=True), load(out / "unet.safetensors"))

    # the reused stages keep the timings of the run that made them
    for name in ("erase-0", "inversion-0", "erase-1"):
        assert result.stages[name] == {**first_result.stages[name], "reused": True}
    assert result.stages["robust"]["reused"] is False


def test_esd_gets_its_settings_concepts_and_erase_from_prompts(inputs, tmp_path, monkeypatch):  # noqa: F811
    from safetensors import safe_open

    from recare_cli.erase import esd
    from recare_cli.erase.esd import EsdSettings

    calls = []
    real = esd.esd_stage

    def esd_stage(models, trainable, concepts, erase_from, settings, loop):
        calls.append((list(trainable), list(concepts), list(erase_from), settings,
                      (loop.stage, loop.total, loop.seed, loop.checkpoint_every, loop.task is not None),
                      models.unet.is_gradient_checkpointing))
        return real(models, trainable, concepts, erase_from, settings, loop)

    monkeypatch.setattr(esd, "esd_stage", esd_stage)
    out = tmp_path / "run"
    request = _request(inputs, out, method="esd", concepts=["nudity", "star"], images=None, careset=None,
                       erase_from=["a photo", "a drawing"], gradient_checkpointing=True)
    result, events = _run(request)
    ((trainable, concepts, erase_from, settings, loop, checkpointing),) = calls
    assert [(e["stage"], e["steps"]) for e in events if e.get("event") == "stage_start"] == [("esd", 1)]
    assert checkpointing is True  # --gradient-checkpointing reaches the UNet
    assert concepts == ["nudity", "star"] and erase_from == ["a photo", "a drawing"]
    assert settings == EsdSettings(iterations=1, lr=3e-5, eta=1.5, resolution=64, prefix_steps=2)
    assert loop == ("esd", 1, 7, 5, True)  # the loop advances the stage's bar (and checks for Ctrl-C there)
    assert trainable and all(".attn2." in k for k in trainable)  # --train-method xattn
    assert result.tokens == [] and not (out / "tokens.safetensors").exists()
    assert list(result.stages) == ["esd"] and [p.name for p in (out / "stages").iterdir()] == ["esd.safetensors"]
    with safe_open(str(out / "unet.safetensors"), framework="pt") as handle:
        assert (handle.metadata()["concept"], handle.metadata()["method"]) == ("nudity, star", "esd")
    assert result.cache_name == f"nudity-star-{json.loads((out / 'recare-run.json').read_text())['run_hash']}"

    erased = load(out / "unet.safetensors")  # a rerun reuses the finished stage
    again, events = _run(request)
    assert len(calls) == 1 and [e["stage"] for e in events if e.get("event") == "stage_reused"] == ["esd"]
    assert same_tensors(load(out / "unet.safetensors"), erased) and again.stages["esd"]["reused"] is True


def test_while_it_runs_the_manifest_says_running_and_holds_each_finished_stage(inputs, tmp_path, monkeypatch):  # noqa: F811
    from recare_cli.erase import esd, run

    out = tmp_path / "run"
    seen = []

    def read():
        seen.append(json.loads((out / "recare-run.json").read_text()))

    real_stage, real_outputs = esd.esd_stage, run._write_outputs
    monkeypatch.setattr(esd, "esd_stage", lambda *args: (read(), real_stage(*args))[1])
    monkeypatch.setattr(run, "_write_outputs", lambda *args: (read(), real_outputs(*args))[1])
    result, _ = _run(_request(inputs, out, method="esd", images=None, careset=None))
    at_start, before_outputs = seen
    assert (at_start["status"], at_start["stages"]) == ("running", {}) and result.cache_name.endswith(at_start["run_hash"])
    assert before_outputs["status"] == "running" and before_outputs["stages"] == {"esd": result.stages["esd"]}
    assert json.loads((out / "recare-run.json").read_text())["status"] == "complete"


def test_a_reused_stage_is_recorded_even_without_its_old_timing_and_moves_the_bar_once():
    from types import SimpleNamespace

    from recare_cli.erase.run import Stages
    from recare_cli.output import Task

    tasks, records, events = {}, [], []

    class Recorder:  # a reporter that keeps its progress tasks
        @contextlib.contextmanager
        def progress(self, description, total):
            tasks[description] = Task()
            yield tasks[description]

        def event(self, kind, **data):
            events.append(kind)

    counter = SimpleNamespace(images=0)
    previous = {"erase-0": {"seconds": 1.5, "unet_images": 7, "reused": False}, "other": {"seconds": 2.0}}
    stages = Stages(["erase-0", "inversion-0", "robust"], counter, Recorder(), previous,
                    lambda record: records.append(copy.deepcopy(record)))
    with stages.outer():
        stages.reused("erase-0")
        stages.reused("inversion-0")  # its file was saved, then the run was killed before the manifest got its timing
        with stages.stage("robust", 3):
            counter.images += 4
    assert records[0] == {"erase-0": {"seconds": 1.5, "unet_images": 7, "reused": True}}  # written at once
    assert records[1] == {**records[0], "inversion-0": {"reused": True}}
    assert records[2] == {**records[1], "robust": {"seconds": records[2]["robust"]["seconds"], "unet_images": 4,
                                                   "reused": False}}
    assert events == ["stage_reused", "stage_reused", "stage_start", "stage_end"]
    assert tasks["stages"].completed == 3  # one step of the outer bar per stage, reused or run


def test_a_careset_keyed_for_another_concept_is_named_before_anything_loads(inputs, tmp_path, monkeypatch):  # noqa: F811
    from recare_cli.erase import run
    from recare_cli.models import Runtime
    from recare_cli.output import JSON, Reporter

    foreign = tmp_path / "star careset.json"
    foreign.write_text(json.dumps({k.replace("nudity", "star"): v for k, v in CARESET.items()}))

    def load_models(*args):
        raise KeyboardInterrupt  # stop where the model would load: the warning must come first

    monkeypatch.setattr(run, "_load_models", load_models)
    stderr = io.StringIO()
    with pytest.raises(KeyboardInterrupt):
        run.run_erase(_request(inputs, tmp_path / "run", careset=foreign), Runtime("tiny-random", device="cpu"),
                      Reporter(JSON, stdout=io.StringIO(), stderr=stderr))
    assert " ".join(stderr.getvalue().split()) == (
        f"Warning: --careset '{foreign}' is keyed 'star_care_word', not for nudity "
        "(expected 'nudity_care_word'); is it the right file?")


# (method, --preserve, --images given, --careset given) -> (images read, CARE set built, stage names before training)
INPUT_CASES = {
    "recare from nothing": ("recare", [], False, False, True, True, ["images", "careset"]),
    "recare with images": ("recare", [], True, False, True, True, ["careset"]),
    "recare with a CARE set": ("recare", [], False, True, True, False, ["images"]),  # the inversion needs images
    "recare with both": ("recare", [], True, True, True, False, []),
    "uce --preserve careset from nothing": ("uce", ["careset"], False, False, True, True, ["images", "careset"]),
    "uce --preserve careset with a CARE set": ("uce", ["careset"], False, True, False, False, []),
    "uce with images": ("uce", ["person"], True, False, False, False, []),  # plain UCE reads no image
    "esd": ("esd", [], False, False, False, False, []),
}


@pytest.fixture(scope="module")
def loaded_models(tiny_model):
    """tiny-random's models, loaded once: the tests below stub every stage that would change them."""
    from recare_cli.erase.context import EraseModels
    from recare_cli.models import Runtime

    return EraseModels.load(Runtime("tiny-random", device="cpu"))


@pytest.mark.parametrize("case", INPUT_CASES)
def test_each_method_gets_exactly_the_inputs_it_lacks_and_reads(inputs, loaded_models, tmp_path, monkeypatch,  # noqa: F811
                                                                case):
    """Which of the images and the CARE set a run builds, from what, and what reaches the method:
    the real run_erase with the builders and the method stubbed, recording their arguments."""
    from recare_cli.erase import run
    from recare_cli.erase.inputs import read_careset_file
    from recare_cli.models import Runtime
    from recare_cli.output import JSON, Reporter

    method, preserve, with_images, with_careset, reads_images, builds, input_stages = INPUT_CASES[case]
    runtime, reporter, models = Runtime("tiny-random", device="cpu"), Reporter(JSON, stdout=io.StringIO()), loaded_models
    images_dirs, built = {"nudity": tmp_path / "images-found"}, object()
    calls: dict[str, tuple] = {}

    def recorder(name, returns):
        def record(*args):
            calls[name] = args
            return returns
        return record

    monkeypatch.setattr(run, "_load_models", lambda *args: models)
    monkeypatch.setattr(run, "training_images", recorder("images", images_dirs))
    monkeypatch.setattr(run, "build_careset_for", recorder("careset", built))
    monkeypatch.setattr(run, "write_careset", recorder("write", None))
    monkeypatch.setattr(run, "_train", recorder("train", [("token_x", None)]))
    monkeypatch.setattr(run, "_edit_uce", recorder("uce", []))
    monkeypatch.setattr(run, "_write_outputs", recorder("outputs", tmp_path / "unet.safetensors"))
    out = tmp_path / "run"
    request = _request(inputs, out, method=method, preserve=preserve, images=inputs["images"] if with_images else None,
                       careset=inputs["careset"] if with_careset else None)
    result = run.run_erase(request, runtime, reporter)

    request = run.with_method_defaults(request)  # what run_erase passes on
    careset = read_careset_file(inputs["careset"]) if with_careset else (built if builds else None)
    if method == "uce":
        assert "train" not in calls and result.tokens == []
        request_seen, plans, models_seen, stages, careset_seen = calls["uce"]
    else:
        assert "uce" not in calls and result.tokens == ["token_x"]
        request_seen, plans, models_seen, images_seen, run_dir, stages, reporter_seen, careset_seen = calls["train"]
        assert images_seen == (images_dirs if reads_images else {}) and (run_dir, reporter_seen) == (out, reporter)
    assert (request_seen, models_seen, careset_seen) == (request, models, careset)
    assert [p.concept for p in plans] == ["nudity"]
    assert stages.names == run._stage_names(request, "images" in input_stages, "careset" in input_stages)

    assert ("images" in calls) == reads_images and ("careset" in calls) == builds
    if reads_images:
        assert calls["images"] == (request, plans, out, runtime, models, stages, reporter)
    if builds:
        assert calls["careset"] == (request, plans, images_dirs, out, runtime, stages, reporter)
    assert calls.get("write") == ((out, request, careset, plans) if careset is not None else None)
    assert json.loads((out / "recare-run.json").read_text())["status"] == "complete"


def test_stage_names_follow_the_method_and_the_missing_inputs():
    from recare_cli.erase.request import EraseRequest
    from recare_cli.erase.run import _stage_names

    recare = EraseRequest(concepts=["nudity"], rounds=3)
    rounds = ["erase-0", "inversion-0", "erase-1", "inversion-1", "erase-2", "inversion-2", "robust"]
    assert _stage_names(recare, need_images=True, need_careset=True) == ["images", "careset", *rounds]
    assert _stage_names(recare, need_images=False, need_careset=True) == ["careset", *rounds]
    assert _stage_names(recare, need_images=False, need_careset=False) == rounds
    esd = EraseRequest(concepts=["nudity"], method="esd")
    assert _stage_names(esd, need_images=False, need_careset=True) == ["esd"]  # ESD reads no CARE set
    uce = EraseRequest(concepts=["nudity"], method="uce")
    assert _stage_names(uce, need_images=True, need_careset=True) == ["images", "careset", "uce"]
    assert _stage_names(uce, need_images=False, need_careset=False) == ["uce"]


def test_an_output_dir_is_resumed_only_when_it_holds_the_same_run(tmp_path):
    from recare_cli.erase.run import _previous_manifest
    from recare_cli.errors import UsageError
    from recare_cli.manifest import RUN_RECORD, Writer

    folder = tmp_path / "run"
    folder.mkdir()
    (folder / ".hidden").write_text("")
    assert _previous_manifest(folder, "abc") == {}  # empty but for hidden files: a new run
    record = Writer("erase", "abc").stamp({"run_hash": "abc", "method": "recare", "stages": {"erase-0": {}}})
    (folder / RUN_RECORD).write_text(json.dumps(record))
    assert _previous_manifest(folder, "abc") == record
    with pytest.raises(UsageError) as caught:
        _previous_manifest(folder, "def")
    assert caught.value.message == f"'{folder}' holds a run with different settings (run hash abc, now def)"
    assert caught.value.hint == "rerun with the same settings to resume it, or choose another --output-dir"

    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(UsageError) as caught:
        _previous_manifest(other, "abc")
    assert caught.value.message == f"--output-dir '{other}' is not empty and holds no erase run"
    assert caught.value.hint == "choose an empty or new folder"
    (other / "notes.txt").unlink()
    (other / RUN_RECORD).write_text("{torn")  # a manifest that cannot be read is no run to resume
    with pytest.raises(UsageError, match="holds recare-run.json written by another program"):
        _previous_manifest(other, "abc")


@pytest.mark.parametrize("stop,status", [(KeyboardInterrupt, "interrupted"), ("Interrupted", "interrupted"),
                                         (RuntimeError, "failed")])
def test_a_stopped_run_is_recorded_as_interrupted_or_failed(inputs, tmp_path, monkeypatch, stop, status):  # noqa: F811
    from recare_cli import errors
    from recare_cli.erase import stage1

    exception = getattr(errors, stop) if isinstance(stop, str) else stop

    def erase_stage(*args, **kwargs):
        raise exception("stop")

    monkeypatch.setattr(stage1, "erase_stage", erase_stage)
    out = tmp_path / "run"
    with pytest.raises(exception):
        _run(_request(inputs, out))
    manifest = json.loads((out / "recare-run.json").read_text())
    assert manifest["status"] == status and not (out / "unet.safetensors").exists()


def test_a_run_without_output_dir_goes_under_runs_named_by_concepts_method_and_hash(inputs):  # noqa: F811
    from recare_cli.erase.request import input_hashes, run_hash
    from recare_cli.erase.run import planned_run_dir
    from recare_cli.models import Runtime

    runtime = Runtime("tiny-random", device="cpu")
    request = _request(inputs, None, method="esd", concepts=["nudity", "star"], images=None, careset=None)
    digest = run_hash(request, runtime.resolve().describe(), runtime.dtype, input_hashes(request))
    assert planned_run_dir(request, runtime) == Path("runs") / f"nudity-star-esd-{digest}"
