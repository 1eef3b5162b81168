"""What reaches each training stage, and a run interrupted at any stage ending bit for bit as an uninterrupted one."""

from __future__ import annotations

import json

import pytest
import torch

from test_erase_cli import CARESET, inputs, load, tiny_args  # noqa: F401 - `inputs` is a fixture

STAGE2_ITERATIONS = 3  # one pass over [concept, token 0, token 1], each anchor and retain once


class PromptRecorder:
    """Names the prompts of every UNet forward: each embedding row is looked up in the encoder's cache."""

    def __init__(self):
        self.stage = None
        self.robust_entry = None  # the trained weights when stage 2 starts
        self.frozen: list[list[str]] = []  # stage 2: prompts of each frozen (snapshot) forward
        self.frozen_weights: list[dict] = []
        self.trained: list[list[str]] = []  # stage 2: prompts of each trained forward

    def prompts(self, models, embeds: torch.Tensor) -> list[str]:
        names = []
        for row in embeds:
            found = [p for p, cached in models._embeds.items() if torch.equal(cached, row)]
            assert len(found) == 1, "every embedding fed to the UNet is a cached prompt's"
            names.append(found[0])
        return names


@pytest.fixture
def recorder(monkeypatch):
    from recare_cli.erase import stage2
    from recare_cli.erase.context import EraseModels

    rec = PromptRecorder()
    real_eps, real_stage = EraseModels.eps, stage2.robust_erase_stage

    def eps(self, latents, t, embeds, weights=None):
        # The partial denoising (no grad, current weights) is neither the frozen nor the trained forward.
        if rec.stage == "robust" and (weights is not None or torch.is_grad_enabled()):
            (rec.trained if weights is None else rec.frozen).append(rec.prompts(self, embeds))
            if weights is not None:
                rec.frozen_weights.append({k: v.detach().clone() for k, v in weights.items()})
        return real_eps(self, latents, t, embeds, weights)

    def robust_erase_stage(models, trainable, *args, **kwargs):
        rec.stage = "robust"
        rec.robust_entry = {k: v.detach().clone() for k, v in trainable.items()}
        try:
            return real_stage(models, trainable, *args, **kwargs)
        finally:
            rec.stage = None

    monkeypatch.setattr(EraseModels, "eps", eps)
    monkeypatch.setattr(stage2, "robust_erase_stage", robust_erase_stage)
    return rec


def test_stage2_sees_the_care_set_the_learned_tokens_and_the_original_weights(run_cli, inputs, tmp_path, recorder,
                                                                             tiny_pipe):
    out = tmp_path / "run"
    result = run_cli(*tiny_args(inputs, out, "--iterations", str(STAGE2_ITERATIONS)))
    assert result.exit_code == 0, result.stderr
    tokens = json.loads(__import__("safetensors").safe_open(str(out / "tokens.safetensors"), "pt").metadata()["tokens"])
    anchors, retains = CARESET["nudity_care_word"], CARESET["nudity_care_word_photo"]
    erase_list = ["nudity", *tokens]  # --num-adv-concepts 2 (the default) of the 2 learned
    assert len(tokens) == 2

    assert len(recorder.frozen) == len(recorder.trained) == STAGE2_ITERATIONS
    for frozen, trained in zip(recorder.frozen, recorder.trained):
        # frozen: neutral, every erase concept, the anchor a_i, the retain prompt r_i
        assert frozen[: 1 + len(erase_list)] == ["", *erase_list]
        anchor, retain = frozen[1 + len(erase_list):]
        assert anchor in anchors and retain in retains
        # trained: the erase prompt e_i and the same retain prompt
        assert trained[0] in erase_list and trained[1] == retain
    assert sorted(t[0] for t in recorder.trained) == sorted(erase_list)
    assert sorted(f[-2] for f in recorder.frozen) == sorted(anchors)
    assert sorted(f[-1] for f in recorder.frozen) == sorted(retains)

    # Stage 2 starts from the original UNet, not stage 1's result, and its frozen weights are the original ones.
    base = tiny_pipe.unet.state_dict()
    assert recorder.robust_entry and all(torch.equal(v, base[k]) for k, v in recorder.robust_entry.items())
    assert all(torch.equal(v, base[k]) for weights in recorder.frozen_weights for k, v in weights.items())
    erased_0 = load(out / "stages" / "erase-0.safetensors")
    assert any(not torch.equal(erased_0[k], base[k]) for k in recorder.robust_entry)  # so the reset is visible


def test_erase_from_applies_to_round_0_only(run_cli, inputs, tmp_path, monkeypatch):  # noqa: F811
    from recare_cli.erase import stage1

    calls = []
    real = stage1.erase_stage

    def recording(models, trainable, concepts, settings, loop, erase_from=None):
        calls.append((loop.stage, list(concepts), erase_from))
        return real(models, trainable, concepts, settings, loop, erase_from)

    monkeypatch.setattr(stage1, "erase_stage", recording)
    out = tmp_path / "run"
    result = run_cli(*tiny_args(inputs, out, "--erase-from", "a photo of a person", "--iterations", "1",
                                "--ti-steps", "1", "--json"))
    assert result.exit_code == 0, result.stderr
    tokens = json.loads(result.stdout.splitlines()[-1])["tokens"]
    # Round 0 erases the concept from the given prompt; later rounds erase the learned token from itself.
    assert calls == [("erase-0", ["nudity"], ["a photo of a person"]), ("erase-1", [tokens[0]], None)]


@pytest.mark.parametrize("dtype,expected", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_erase_dtype_runs_the_forwards_under_autocast_and_keeps_fp32_weights(run_cli, inputs, tmp_path, dtype,
                                                                          expected, monkeypatch):  # noqa: F811
    from safetensors import safe_open

    from recare_cli.erase.context import EraseModels

    seen = []
    real = EraseModels.eps

    def eps(self, latents, t, embeds, weights=None):
        handle = self.unet.conv_in.register_forward_hook(lambda module, args, output: seen.append(
            (output.dtype, module.weight.dtype)))
        try:
            return real(self, latents, t, embeds, weights)
        finally:
            handle.remove()

    monkeypatch.setattr(EraseModels, "eps", eps)
    out = tmp_path / "run"
    result = run_cli(*tiny_args(inputs, out, "--method", "esd", "--iterations", "1", "--dtype", dtype))
    assert result.exit_code == 0, result.stderr
    assert seen and set(seen) == {(expected, torch.float32)}  # computed in `dtype`, weights trained in fp32
    with safe_open(str(out / "unet.safetensors"), framework="pt") as handle:
        assert {handle.get_slice(k).get_dtype() for k in handle.keys()} == {"F32"}
    assert json.loads((out / "recare-run.json").read_text())["dtype"] == dtype


def test_a_config_file_wins_over_a_builtin_models_defaults(run_cli, tmp_path, monkeypatch):
    from recare_cli.erase import run as erase_run
    from recare_cli.errors import RecareError
    from recare_cli.presets import MODEL_DEFAULTS

    config = tmp_path / "config.toml"
    config.write_text("[erase]\nstage2_lr = 3e-5\nresolution = 64\n")
    monkeypatch.setenv("RECARE_CONFIG", str(config))
    received = []

    def record(request, runtime, reporter):  # what the method is asked to run, then stop before any training
        received.append(request)
        raise RecareError("recorded")

    monkeypatch.setattr(erase_run, "run_erase", record)
    result = run_cli("erase", "--concept", "star", "--model", "toy", "--stage1-lr", "1e-3", "--device", "cpu")
    assert result.exit_code == 1 and "recorded" in result.stderr
    (request,) = received
    toy = MODEL_DEFAULTS["toy"]
    assert toy["stage2_lr"] != 3e-5 and toy["resolution"] != 64 and toy["stage1_lr"] != 1e-3
    assert request.stage2_lr == 3e-5 and request.resolution == 64  # the config file over the toy's defaults
    assert request.stage1_lr == 1e-3  # a typed flag over both
    assert request.iterations == toy["iterations"] and request.ti_steps == toy["ti_steps"]  # the rest: the toy's
