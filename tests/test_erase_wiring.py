"""run_erase's wiring: which setting reaches which stage, what each stage starts from, what is
written where, and which finished stages a rerun reuses. Spies record each stage's arguments and
then run the real stage, on tiny-random with one step a stage."""

from __future__ import annotations

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
        result, events = _run(_request(inputs, out), spy)
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
    assert manifest["concepts"] == ["nudity"] and manifest["type"] == plan_concept("nudity").concept_type and manifest["dtype"] == "auto"
    entry = json.loads((erased_dir(cache_dir, result.cache_name) / "entry.json").read_text())
    assert entry["run_dir"] == str(out.resolve()) and entry["tokens"] == tokens and entry["concepts"] == ["nudity"]
    assert (entry["method"], entry["model"], entry["run_hash"]) == ("recare", "tiny-random", manifest["run_hash"])


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
                      (loop.stage, loop.total, loop.seed, loop.checkpoint_every)))
        return real(models, trainable, concepts, erase_from, settings, loop)

    monkeypatch.setattr(esd, "esd_stage", esd_stage)
    out = tmp_path / "run"
    request = _request(inputs, out, method="esd", concepts=["nudity", "star"], images=None, careset=None,
                       erase_from=["a photo", "a drawing"])
    result, _ = _run(request)
    ((trainable, concepts, erase_from, settings, loop),) = calls
    assert concepts == ["nudity", "star"] and erase_from == ["a photo", "a drawing"]
    assert settings == EsdSettings(iterations=1, lr=3e-5, eta=1.5, resolution=64, prefix_steps=2)
    assert loop == ("esd", 1, 7, 5)
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
    with pytest.raises(UsageError, match="different settings.*abc.*now def"):
        _previous_manifest(folder, "def")

    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="not empty and holds no erase run"):
        _previous_manifest(other, "abc")


# context.py: the models and how the stages call them ------------------------------------------------

@pytest.fixture
def models(tiny_pipe):
    from recare_cli.erase.context import EraseModels

    pipe = copy.deepcopy(tiny_pipe)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.requires_grad_(True)
        module.train()
    return EraseModels.from_pipeline(pipe, "cpu")


@pytest.mark.parametrize("dtype,autocast", [("fp32", None), ("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_models_load_in_fp32_and_dtype_only_picks_autocast(tiny_model, dtype, autocast):
    from recare_cli.erase.context import EraseModels
    from recare_cli.models import Runtime

    models = EraseModels.load(Runtime("tiny-random", device="cpu", dtype=dtype))
    assert models.autocast_dtype == autocast and models.device == "cpu"
    assert {p.dtype for p in models.unet.parameters()} == {p.dtype for p in models.text_encoder.parameters()} == {
        torch.float32}


def test_models_come_frozen_in_eval_mode_with_a_ddim_scheduler_and_a_forward_counter(models, tiny_pipe):
    from diffusers import DDIMScheduler

    for module in (models.unet, models.vae, models.text_encoder):
        assert not module.training and not any(p.requires_grad for p in module.parameters())
    assert type(models.scheduler) is DDIMScheduler
    assert models.scheduler.config.num_train_timesteps == tiny_pipe.scheduler.config.num_train_timesteps
    assert models.text_encoders == [(models.text_encoder, models.tokenizer)] and models.autocast_dtype is None
    assert models.vae_factor == 8 and models.latent_shape(64) == (1, 4, 8, 8)  # the VAE halves 3 times
    with torch.no_grad():
        latents = models.vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean
        assert latents.shape == models.latent_shape(64)
        embeds = models.embed(["a", "b", "c"])
        models.unet(torch.zeros(3, 4, 8, 8), torch.tensor(10), encoder_hidden_states=embeds)
        models.unet(sample=torch.zeros(2, 4, 8, 8), timestep=torch.tensor(10), encoder_hidden_states=embeds[:2])
    assert models.counter.images == 5  # images, not calls, positional or not
    assert models.vae_scale == tiny_pipe.vae.config.scaling_factor


def test_token_ids_are_padded_and_cut_to_the_tokenizers_length(models):
    ids = models.token_ids(["a cat", " ".join(["cat"] * 200)])
    length = models.tokenizer.model_max_length
    assert ids.shape == (2, length)
    assert ids[0].tolist() == models.tokenizer("a cat", padding="max_length", max_length=length).input_ids


def test_embed_caches_each_prompt_until_a_token_is_learned(models):
    with torch.no_grad():
        direct = models.text_encoder(models.token_ids(["a cat", "a dog"]))[0]
    embeds = models.embed(["a cat", "a dog", "a cat"])
    assert embeds.shape == (3, *direct.shape[1:]) and not embeds.requires_grad
    assert torch.equal(embeds[0], direct[0]) and torch.equal(embeds[1], direct[1]) and torch.equal(embeds[2], direct[0])
    assert list(models._embeds) == ["a cat", "a dog"]  # each prompt encoded once

    with torch.no_grad():  # the text encoder changes: the cache answers the old value until told
        models.text_encoder.get_input_embeddings().weight.mul_(2)
    assert torch.equal(models.embed(["a cat"])[0], direct[0])
    models.forget_embeddings()
    assert not torch.equal(models.embed(["a cat"])[0], direct[0])
    assert models.cross_attention_context(embeds) is embeds  # SD: every row is cross-attention context


def test_eps_with_weights_uses_them_for_this_call_only(models):
    from recare_cli.erase.context import load_into, snapshot
    from recare_cli.erase.params import select_trainable

    trainable = select_trainable(models.unet, "xattn")
    frozen = snapshot(trainable)
    assert all(not v.requires_grad and v.data_ptr() != trainable[k].data_ptr() for k, v in frozen.items())
    latents, embeds = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), models.embed(["a cat"])
    before = models.eps(latents, 500, embeds)
    assert torch.equal(models.eps(latents, torch.tensor(500), embeds), before)  # int or tensor timestep
    with torch.no_grad():
        for p in trainable.values():
            p.add_(0.05)
    moved = models.eps(latents, 500, embeds)
    assert not torch.allclose(moved, before)
    assert torch.allclose(models.eps(latents, 500, embeds, weights=frozen), before, atol=1e-6)
    assert torch.equal(models.eps(latents, 500, embeds), moved)  # the UNet's own weights are untouched
    load_into(trainable, {k: v.double() for k, v in frozen.items()})  # cast to each parameter's dtype
    assert all(p.dtype == torch.float32 and torch.equal(p, frozen[k]) for k, p in trainable.items())


def test_eps_under_autocast_computes_in_bf16_and_answers_in_fp32(models):
    models.autocast_dtype = torch.bfloat16
    seen = []
    models.unet.conv_in.register_forward_hook(lambda module, args, output: seen.append(output.dtype))
    out = models.eps(torch.randn(1, 4, 8, 8), 500, models.embed(["a cat"]))
    assert seen == [torch.bfloat16] and out.dtype == torch.float32
    with models.vae_autocast():  # the VAE's config asks for float32
        assert not torch.is_autocast_enabled("cpu")


def test_regression_step_takes_one_adamw_step_on_the_mse(models):
    from recare_cli.erase.context import regression_step
    from recare_cli.erase.params import select_trainable

    trainable = select_trainable(models.unet, "xattn")
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-3)
    latents, embeds = torch.randn(1, 4, 8, 8), models.embed(["a cat"])
    target = torch.zeros(1, 4, 8, 8)
    with torch.no_grad():
        expected = torch.nn.functional.mse_loss(models.eps(latents, 500, embeds), target)
    before = {k: v.detach().clone() for k, v in trainable.items()}
    for p in trainable.values():
        p.grad = torch.full_like(p, 1e6)  # a stale gradient the step must not add to
    loss = regression_step(models, optimizer, latents, 500, embeds, target)
    assert torch.allclose(loss, expected)
    with torch.no_grad():
        after = torch.nn.functional.mse_loss(models.eps(latents, 500, embeds), target)
    assert after < expected and any(not torch.equal(before[k], p) for k, p in trainable.items())
    assert all(p.grad.abs().max() < 1e3 for p in trainable.values())  # this step's gradient alone


def test_no_grad_into_switches_off_and_restores_exactly_the_wanted_gradients():
    from recare_cli.erase.context import no_grad_into

    module = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    module[1].requires_grad_(False)
    with pytest.raises(RuntimeError):
        with no_grad_into(module):
            assert not any(p.requires_grad for p in module.parameters())
            raise RuntimeError
    assert all(p.requires_grad for p in module[0].parameters())
    assert not any(p.requires_grad for p in module[1].parameters())


def test_embedding_matrix_name_names_the_token_embedding(models):
    from recare_cli.erase.context import embedding_matrix_name

    name = embedding_matrix_name(models.text_encoder)
    assert dict(models.text_encoder.named_parameters())[name] is models.text_encoder.get_input_embeddings().weight


# inversion.py: tokens, images, and what each inversion step sees ------------------------------------

def test_inversion_settings_default_to_the_requests_defaults():
    from recare_cli.erase.inversion import InversionSettings
    from recare_cli.erase.request import EraseRequest

    request = EraseRequest(concepts=["nudity"])
    assert InversionSettings() == InversionSettings(request.ti_steps, request.ti_lr, request.resolution,
                                                    request.center_crop)


def test_initializer_must_be_one_token_and_the_error_shows_the_pieces(models):
    from recare_cli.erase.inversion import initializer_id
    from recare_cli.errors import UsageError

    assert models.tokenizer.convert_ids_to_tokens([initializer_id(models.tokenizer, "person")])[0].startswith("person")
    with pytest.raises(UsageError, match=r"'a person' is 2 tokens for this tokenizer \(a</w> person</w>\), not one"):
        initializer_id(models.tokenizer, "a person")
    with pytest.raises(UsageError, match=r"'' is 0 tokens for this tokenizer \(none\)"):
        initializer_id(models.tokenizer, "")


def test_new_token_names_are_fresh_and_follow_the_seed_and_round():
    import re

    from recare_cli.erase.inversion import new_token_name

    name = new_token_name(3, 0, set())
    assert re.fullmatch(r"token_[a-z0-9]{8}", name) and name == new_token_name(3, 0, {"token_other"})
    assert len({name, new_token_name(4, 0, set()), new_token_name(3, 1, set())}) == 3
    other = new_token_name(3, 0, {name})
    assert re.fullmatch(r"token_[a-z0-9]{8}", other) and other != name


def test_add_token_writes_the_row_and_refuses_a_name_twice(models):
    from recare_cli.erase.inversion import add_token, split_rows, token_embedding
    from recare_cli.errors import RecareError

    models.embed(["a cat"])
    row = torch.randn(models.text_encoder.get_input_embeddings().weight.shape[1])
    token_id = add_token(models, "token_abcdefgh", row)
    assert token_id == models.tokenizer.convert_tokens_to_ids("token_abcdefgh") == len(models.tokenizer) - 1
    assert torch.equal(token_embedding(models, token_id), row) and not models._embeds  # cached embeddings dropped
    assert [r.shape for r in split_rows(models, row)] == [row.shape]
    with pytest.raises(RecareError, match="token 'token_abcdefgh' already exists"):
        add_token(models, "token_abcdefgh", row)


def test_add_token_refuses_tokenizers_that_give_it_different_ids(models):
    from recare_cli.erase.inversion import add_token
    from recare_cli.errors import RecareError

    models.text_encoder_2, models.tokenizer_2 = copy.deepcopy(models.text_encoder), copy.deepcopy(models.tokenizer)
    models.tokenizer_2.add_tokens(["token_onlyhere"])  # the second vocabulary is one longer
    width = models.text_encoder.get_input_embeddings().weight.shape[1]
    first = len(models.tokenizer)
    with pytest.raises(RecareError, match=rf"token 'token_abcdefgh' got different ids .*\[{first}, {first + 1}\]"):
        add_token(models, "token_abcdefgh", torch.zeros(2 * width))


def test_round_subset_takes_consecutive_chunks_and_wraps():
    from recare_cli.erase.inversion import round_subset

    images = [Path(f"{i}.png") for i in range(5)]
    assert [round_subset(images, 2, r) for r in range(3)] == [images[0:2], images[2:4], [images[4], images[0]]]
    assert [round_subset(images, 7, r) for r in (0, 4, 6)] == [[images[0]], [images[4]], [images[1]]]  # chunks of 1


def _bands(path: Path, shape: tuple[int, int], axis: int) -> None:
    """An image in three bands (red, green, blue) along `axis` (1: left to right, 0: top to bottom)."""
    import numpy as np
    from PIL import Image

    array = np.zeros((*shape, 3), dtype=np.uint8)
    third = shape[axis] // 3
    for channel in range(3):
        index = [slice(None), slice(None)]
        index[axis] = slice(channel * third, (channel + 1) * third)
        array[tuple(index) + (channel,)] = 255
    Image.fromarray(array).save(path)


@pytest.mark.parametrize("shape,axis", [((12, 36), 1), ((36, 12), 0)])
def test_load_pixels_crops_the_centre_resizes_and_maps_to_minus_one_one(tmp_path, shape, axis):
    from recare_cli.erase.inversion import load_pixels

    _bands(tmp_path / "bands.png", shape, axis)
    green = load_pixels(tmp_path / "bands.png", 8, center_crop=True)
    assert green.shape == (3, 8, 8) and green.dtype == torch.float32
    assert torch.equal(green[1], torch.ones(8, 8)) and torch.equal(green[0], -torch.ones(8, 8))
    assert torch.equal(green[2], -torch.ones(8, 8))
    whole = load_pixels(tmp_path / "bands.png", 9, center_crop=False)  # all three bands, squeezed
    first, last = (whole[:, :, 0], whole[:, :, -1]) if axis == 1 else (whole[:, 0], whole[:, -1])
    assert torch.allclose(first[0], torch.ones(9), atol=0.05) and torch.allclose(last[2], torch.ones(9), atol=0.05)
    assert whole.min() >= -1.05 and whole.max() <= 1.05


def test_load_pixels_names_an_unreadable_image(tmp_path):
    from recare_cli.erase.inversion import load_pixels
    from recare_cli.errors import RecareError

    (tmp_path / "torn.png").write_bytes(b"\x89PNG\r\n")
    with pytest.raises(RecareError, match="cannot read training image '.*torn.png'"):
        load_pixels(tmp_path / "torn.png", 8, False)


def test_latent_cache_encodes_each_image_and_flip_once(models, tmp_path):
    from recare_cli.erase.inversion import InversionSettings, LatentCache, load_pixels

    _bands(tmp_path / "0.png", (12, 36), 1)
    _bands(tmp_path / "1.png", (36, 12), 0)
    images = [tmp_path / "0.png", tmp_path / "1.png"]
    encoded = []
    encode = models.vae.encode
    models.vae.encode = lambda pixels: encoded.append(pixels) or encode(pixels)
    cache = LatentCache(models, images, InversionSettings(resolution=16, center_crop=False))  # bands: not symmetric
    for index, flip in [(1, True), (0, False), (1, True), (1, False), (0, False)]:
        mean, std = cache.distribution(index, flip)
        pixels = load_pixels(images[index], 16, False)
        pixels = pixels.flip(-1) if flip else pixels
        with torch.no_grad():
            expected = encode(pixels.unsqueeze(0)).latent_dist
        assert torch.equal(mean, expected.mean) and torch.equal(std, expected.std)
    assert len(encoded) == 3
    assert cache.distribution(0, True)[0].shape == models.latent_shape(16)


def test_epoch_order_shows_every_image_once_per_epoch():
    from recare_cli.erase.inversion import epoch_order

    orders = {(seed, epoch): epoch_order(seed, epoch, 9) for seed in (0, 1) for epoch in (0, 1)}
    assert all(sorted(order) == list(range(9)) for order in orders.values())
    assert len({tuple(order) for order in orders.values()}) == 4
    assert epoch_order(1, 0, 9) == orders[(1, 0)]


def test_each_inversion_step_sees_one_image_a_flip_a_template_and_a_timestep(models, tmp_path, monkeypatch):
    from recare_cli.erase import inversion
    from recare_cli.erase.inversion import InversionSettings, add_token, initializer_id, inversion_stage

    images = []
    for i, (shape, axis) in enumerate([((12, 36), 1), ((36, 12), 0), ((24, 24), 1)]):
        _bands(tmp_path / f"{i}.png", shape, axis)
        images.append(tmp_path / f"{i}.png")
    templates = ("a photo of {}", "a drawing of {}", "{} in a painting")
    token = "token_testsees"
    token_id = add_token(models, token, models.text_encoder.get_input_embeddings().weight[
        initializer_id(models.tokenizer, "person")].detach().clone())

    seen = {"drawn": [], "captions": [], "randint": [], "randn": [], "noised": []}
    distribution = inversion.LatentCache.distribution
    monkeypatch.setattr(inversion.LatentCache, "distribution", lambda self, index, flip: (
        seen["drawn"].append((index, flip)), distribution(self, index, flip))[1])
    encode = models.encode
    monkeypatch.setattr(models, "encode", lambda prompts, tables=None: (
        seen["captions"].extend(prompts), encode(prompts, tables))[1])
    randint, randn_like = torch.randint, torch.randn_like
    monkeypatch.setattr(torch, "randint", lambda low, high, size, **kw: (
        seen["randint"].append((low, high, size)), randint(low, high, size, **kw))[1])
    monkeypatch.setattr(torch, "randn_like", lambda x: (seen["randn"].append(randn_like(x)), seen["randn"][-1])[1])
    add_noise = models.scheduler.add_noise
    monkeypatch.setattr(models.scheduler, "add_noise", lambda x0, noise, t: (
        seen["noised"].append((x0, noise)), add_noise(x0, noise, t))[1])

    steps = 9
    loop = _OptimizerLoop()
    learned = inversion_stage(models, token_id, images, templates, token,
                              InversionSettings(steps=steps, lr=7e-3, resolution=64), loop)
    monkeypatch.undo()

    # every image once per epoch, in the epoch's order; both flips; a template with the token each step
    indices = [index for index, _ in seen["drawn"]]
    assert [indices[i:i + 3] for i in range(0, steps, 3)] == [inversion.epoch_order(0, e, 3) for e in range(3)]
    assert {flip for _, flip in seen["drawn"]} == {True, False}
    assert len(seen["captions"]) == steps and all(c in [t.format(token) for t in templates] for c in seen["captions"])
    assert len(set(seen["captions"])) > 1
    # t ~ U{0..998} (recare-method.md §4.2), one per step; z0 sampled from the cached distribution, scaled
    assert seen["randint"] == [(0, 999, (1,))] * steps
    cache = inversion.LatentCache(models, images, InversionSettings(resolution=64))
    for (index, flip), (x0, noise), sample, fresh in zip(seen["drawn"], seen["noised"], seen["randn"][0::2],
                                                        seen["randn"][1::2], strict=True):
        mean, std = cache.distribution(index, flip)
        assert torch.allclose(x0, (mean + std * sample) * models.vae_scale) and noise is fresh
    # AdamW at the settings' rate on the token row alone, which ends written into the text encoder
    assert type(loop.optimizer) is torch.optim.AdamW and loop.optimizer.defaults["lr"] == 7e-3
    (row,) = loop.optimizer.param_groups[0]["params"]
    assert torch.equal(row.detach(), learned)
    assert torch.equal(models.text_encoder.get_input_embeddings().weight[token_id], learned)


class _OptimizerLoop:
    """A StageLoop stand-in: starts at step 0 and keeps the optimizer it was given."""

    seed = 0

    def resume(self, params, optimizer, buffers=None):
        self.optimizer = optimizer
        return 0

    def step_done(self, step, **losses):
        pass


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
