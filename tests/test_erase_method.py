"""The ReCARE method's pieces against hand-computed values and the tiny-random model."""

from __future__ import annotations

import copy
from collections import Counter

import numpy as np
import pytest
import torch
from stage_spies import RecordingLoop, record_training, unet_eps


# schedules -----------------------------------------------------------------------------------

@pytest.mark.parametrize("items,iterations", [(["a", "b", "c"], 10), (["a", "b"], 6), (["a", "b", "c", "d"], 3)])
def test_balanced_schedule(items, iterations):
    from recare_cli.erase.stage2 import balanced_schedule

    schedule = balanced_schedule(items, iterations, np.random.default_rng(0))
    assert len(schedule) == iterations
    counts = Counter(schedule)
    base = iterations // len(items)
    assert set(counts) <= set(items)
    assert all(counts[item] in (base, base + 1) for item in items)
    assert sum(1 for item in items if counts[item] == base + 1) == iterations - base * len(items)
    assert all(isinstance(item, str) for item in schedule)


def test_balanced_schedule_depends_only_on_the_seed():
    from recare_cli.erase.stage2 import balanced_schedule

    first = balanced_schedule(list("abcdefg"), 40, np.random.default_rng(5))
    assert first == balanced_schedule(list("abcdefg"), 40, np.random.default_rng(5))
    assert first != balanced_schedule(list("abcdefg"), 40, np.random.default_rng(6))


# partial denoising -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def times(tiny_pipe):
    from recare_cli.erase.denoise import DDIMTimes

    return DDIMTimes(tiny_pipe.scheduler)


def test_training_timestep_is_the_same_fraction_of_the_1000_step_schedule(times):
    assert times.training_timestep(1) == times.timesteps_1000[20]
    assert times.training_timestep(48) == times.timesteps_1000[960]


def test_prefix_with_50_steps_is_ddim_step_for_step(tiny_pipe, times):
    from diffusers import DDIMScheduler

    from recare_cli.erase.denoise import partial_denoise

    weights = torch.randn(4, 1, 1)

    def predict(latents, t, embeds):  # a stand-in UNet that depends on latents, t and the prompt
        return torch.tanh(latents * weights + t / 1000.0) + embeds.mean() * torch.arange(len(latents)).view(-1, 1, 1, 1)

    embeds = torch.randn(2, 3, 5)
    k = 7
    latents_T = torch.randn(1, 4, 8, 8)
    ours = partial_denoise(predict, latents_T, embeds, times, k, prefix_steps=50)

    ddim = DDIMScheduler.from_config(tiny_pipe.scheduler.config)
    ddim.set_timesteps(50)
    latents = latents_T
    for t in ddim.timesteps[:k]:
        eps_uncond, eps_cond = predict(torch.cat([latents, latents]), int(t), embeds).chunk(2)
        latents = ddim.step(eps_uncond + 3 * (eps_cond - eps_uncond), t, latents).prev_sample
    assert torch.allclose(ours, latents, atol=1e-5)


def test_prefix_on_a_v_prediction_model_is_ddim_step_for_step(tiny_v_pipe):
    """tiny-random-v predicts v: the prefix must step as diffusers' DDIMScheduler does on the same outputs."""
    from diffusers import DDIMScheduler

    from recare_cli.erase.context import EraseModels
    from recare_cli.erase.denoise import partial_denoise

    models = EraseModels.from_pipeline(copy.deepcopy(tiny_v_pipe), "cpu")
    assert models.times.prediction_type == "v_prediction"
    embeds = models.embed(["", "a photo of a cat"])
    k = 4
    latents_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(k))
    ours = partial_denoise(models.eps, latents_T, embeds, models.times, k, prefix_steps=50)

    ddim = DDIMScheduler.from_config(tiny_v_pipe.scheduler.config)
    ddim.set_timesteps(50)
    latents = latents_T
    for t in ddim.timesteps[:k]:
        v_uncond, v_cond = models.eps(torch.cat([latents, latents]), int(t), embeds).chunk(2)
        latents = ddim.step(v_uncond + 3 * (v_cond - v_uncond), t, latents).prev_sample
    assert torch.allclose(ours, latents, atol=1e-5)
    assert (ours - latents_T).abs().max() > 1e-3  # it did step


def test_training_draws_k_from_1_to_48(models, monkeypatch):
    from recare_cli.erase import denoise

    drawn = []

    def prefix(predict, latents_T, embeds, times, k, prefix_steps):  # records k, skips the k UNet steps
        drawn.append(k)
        return latents_T

    monkeypatch.setattr(denoise, "partial_denoise", prefix)
    torch.manual_seed(0)
    timesteps = [denoise.draw_training_latent(models, None, 64)[1] for _ in range(600)]
    assert set(drawn) == set(range(1, 49))  # U{1..48}: never 0, never 49
    assert timesteps == [models.times.training_timestep(k) for k in drawn]


@pytest.mark.parametrize("k", [1, 2, 17, 48])
def test_fewer_prefix_steps_end_at_the_same_noise_level(times, k):
    exact = times.prefix_timesteps(k, 50)
    coarse = times.prefix_timesteps(k, 10)
    assert exact == [*times.timesteps_50[:k], times.timesteps_50[k - 1] - 20]
    assert coarse[0] == exact[0] and coarse[-1] == exact[-1]
    assert len(coarse) - 1 == max(1, round(k * 10 / 50))
    assert coarse == sorted(coarse, reverse=True)


def _ddim(tiny_pipe, **config):
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config({**tiny_pipe.scheduler.config, **config})


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_one_ddim_step_is_diffusers_step_for_each_prediction_type(tiny_pipe, prediction_type):
    from recare_cli.erase.denoise import DDIMTimes, ddim_step

    scheduler = _ddim(tiny_pipe, prediction_type=prediction_type, clip_sample=False)
    times = DDIMTimes(scheduler)
    scheduler.set_timesteps(50)
    generator = torch.Generator().manual_seed(0)
    latents, output = torch.randn(2, 1, 4, 4, 4, generator=generator)
    for t in (times.timesteps_50[0], times.timesteps_50[25], times.timesteps_50[-1]):  # the last steps onto t < 0
        expected = scheduler.step(output, t, latents, eta=0.0).prev_sample
        args = (latents, output, times.alpha(t), times.alpha(t - times.stride_50))
        stepped = ddim_step(*args) if prediction_type == "epsilon" else ddim_step(*args, prediction_type)
        torch.testing.assert_close(stepped, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("set_alpha_to_one", [True, False])
def test_the_step_past_the_last_timestep_uses_the_schedulers_final_alpha(tiny_pipe, set_alpha_to_one):
    from recare_cli.erase.denoise import DDIMTimes

    scheduler = _ddim(tiny_pipe, set_alpha_to_one=set_alpha_to_one)
    times = DDIMTimes(scheduler)
    assert torch.equal(times.alpha(0), scheduler.alphas_cumprod[0]) and torch.equal(times.alpha(7), scheduler.alphas_cumprod[7])
    assert float(times.alpha(-1)) == (1.0 if set_alpha_to_one else float(scheduler.alphas_cumprod[0]))


def test_a_schedule_whose_length_is_not_a_multiple_of_50_keeps_whole_timesteps(tiny_pipe):
    from recare_cli.erase.denoise import DDIMTimes

    scheduler = _ddim(tiny_pipe, num_train_timesteps=1025)
    times = DDIMTimes(scheduler)
    scheduler.set_timesteps(50)
    for k in (1, 17, 48):  # the 50-step prefix lands where DDIM's k-th step does: 1025 // 50 below t_k
        assert times.prefix_timesteps(k, 50) == [*times.timesteps_50[:k], times.timesteps_50[k - 1] - 1025 // 50]
        assert times.timesteps_50 == [int(t) for t in scheduler.timesteps]


def test_a_model_predicting_something_else_is_refused_with_the_types_recare_trains(tiny_pipe):
    from recare_cli.erase.denoise import DDIMTimes
    from recare_cli.errors import RecareError

    scheduler = _ddim(tiny_pipe)
    scheduler.register_to_config(prediction_type="flow")
    with pytest.raises(RecareError) as caught:
        DDIMTimes(scheduler)
    assert caught.value.message == "the model's scheduler predicts 'flow', which recare cannot train"
    assert caught.value.hint == "models predicting epsilon or v_prediction or sample are supported"


# trainable parameters -------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["noxattn", "xattn", "xattn-strict", "selfattn", "full"])
def test_each_train_method_changes_exactly_its_modules(tiny_pipe, method):
    from recare_cli.erase.params import select_trainable

    unet = copy.deepcopy(tiny_pipe.unet)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    trainable = select_trainable(unet, method)
    names = list(trainable)
    if method == "xattn-strict":  # every cross-attention key and value projection, nothing else
        assert names == [n for n, _ in unet.named_parameters() if ".attn2.to_k." in n or ".attn2.to_v." in n]
        assert any(".attn2.to_k." in n for n in names) and any(".attn2.to_v." in n for n in names)
    if method == "xattn":
        assert names and all(".attn2." in n for n in names)
        assert any(".attn2.to_q." in n for n in names) and any(".attn2.to_out." in n for n in names)
    if method == "noxattn":
        assert not any("attn2" in n for n in names) and "conv_in.weight" in names
    if method == "selfattn":
        assert names and all(".attn1." in n for n in names)
    if method == "full":
        assert any("attn2" in n for n in names) and any("attn1" in n for n in names)
    assert not any("norm" in n.rsplit(".", 2)[-2] for n in names)  # only Linear / Conv2d weights

    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-2)
    torch.manual_seed(0)
    out = unet(torch.randn(1, 4, 8, 8), torch.tensor(500), encoder_hidden_states=torch.randn(1, 77, 32)).sample
    out.pow(2).mean().backward()
    optimizer.step()
    changed = {k for k, v in unet.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == set(names)


def test_unknown_train_method_is_a_usage_error(tiny_pipe):
    from recare_cli.erase.params import select_trainable
    from recare_cli.errors import UsageError

    with pytest.raises(UsageError) as caught:
        select_trainable(copy.deepcopy(tiny_pipe.unet), "attn3")
    assert caught.value.message == "unknown --train-method 'attn3'"
    assert caught.value.hint == "choose one of noxattn, xattn, xattn-strict, selfattn, full"


# training loops on tiny-random ----------------------------------------------------------------

@pytest.fixture
def models(tiny_pipe):
    from recare_cli.erase.context import EraseModels

    return EraseModels.from_pipeline(copy.deepcopy(tiny_pipe), "cpu")


def _stage1_objective(models, frozen, draws, prompt):
    """The stage-1 loss on fixed (k, z_T) draws, with z_k and the target from the frozen weights."""
    from recare_cli.erase.denoise import partial_denoise
    from recare_cli.erase.guidance import single_negative_target

    embeds_c, embeds_neutral = models.embed([prompt]), models.embed([""])
    total = 0.0
    with torch.no_grad():
        for k, latents_T in draws:
            latents_k = partial_denoise(lambda *a: models.eps(*a, weights=frozen), latents_T,
                                        torch.cat([embeds_neutral, embeds_c]), models.times, k, 1)
            t = models.times.training_timestep(k)
            eps_pos, eps_neu = models.eps(latents_k.expand(2, -1, -1, -1), t, torch.cat([embeds_c, embeds_neutral]),
                                          weights=frozen).chunk(2)
            target = single_negative_target(eps_pos, eps_neu, 2.0)
            total += torch.nn.functional.mse_loss(models.eps(latents_k, t, embeds_c), target).item()
    return total / len(draws)


def test_erase_loss_falls_on_tiny_random(tiny_pipe, tmp_path):
    from recare_cli.erase.context import EraseModels, snapshot
    from recare_cli.erase.loop import StageLoop
    from recare_cli.erase.params import select_trainable
    from recare_cli.erase.stage1 import EraseSettings, erase_stage

    pipe = copy.deepcopy(tiny_pipe)
    with torch.no_grad():  # random weights barely listen to the prompt; make cross-attention count
        for name, param in pipe.unet.named_parameters():
            if "attn2.to_out" in name:
                param.mul_(30)
    models = EraseModels.from_pipeline(pipe, "cpu")
    trainable = select_trainable(models.unet, "xattn")
    frozen = snapshot(trainable)
    generator = torch.Generator().manual_seed(123)
    draws = [(int(k), torch.randn(1, 4, 8, 8, generator=generator))
             for k in torch.randint(1, 49, (6,), generator=generator)]
    before = _stage1_objective(models, frozen, draws, "a photo of a cat")
    settings = EraseSettings(iterations=30, lr=1e-4, resolution=64, prefix_steps=1)
    erase_stage(models, trainable, ["a photo of a cat"], settings, StageLoop(tmp_path, "erase-0", 30, 0, 1000))
    after = _stage1_objective(models, frozen, draws, "a photo of a cat")
    assert after < 0.5 * before


def test_erase_from_conditions_only_the_trained_prediction(models, tmp_path, monkeypatch):
    from recare_cli.erase.loop import StageLoop
    from recare_cli.erase.params import select_trainable
    from recare_cli.erase.stage1 import EraseSettings, erase_stage

    concept, source = "a photo of a cat", "a painting"
    calls = []  # (trained?, embeds of the last prompt in the batch)
    eps = models.eps
    monkeypatch.setattr(models, "eps", lambda latents, t, embeds, weights=None:
                        calls.append((weights is None and torch.is_grad_enabled(), embeds[-1:].detach().clone()))
                        or eps(latents, t, embeds, weights=weights))
    settings = EraseSettings(iterations=2, lr=1e-4, resolution=64, prefix_steps=1)
    erase_stage(models, select_trainable(models.unet, "xattn"), [concept], settings,
                StageLoop(tmp_path, "erase-0", 2, 0, 1000), erase_from=[source])
    trained = [embeds for is_trained, embeds in calls if is_trained]
    frozen = [embeds for is_trained, embeds in calls if not is_trained]
    assert len(trained) == 2 and all(torch.equal(e, models.embed([source])) for e in trained)
    assert not any(torch.equal(e, models.embed([source])) for e in frozen)


def test_inversion_moves_only_the_new_token_row(models, tmp_path):
    from PIL import Image

    from recare_cli.builtins.concept_types import OBJECT_TEMPLATES
    from recare_cli.erase.inversion import InversionSettings, add_token, initializer_id, inversion_stage
    from recare_cli.erase.loop import StageLoop

    for i in range(2):
        Image.fromarray(np.full((48, 40, 3), 60 * i + 30, dtype=np.uint8)).save(tmp_path / f"{i}.png")
    init = initializer_id(models.tokenizer, "person")
    weight = models.text_encoder.get_input_embeddings().weight
    token_id = add_token(models, "token_testabcd", weight[init].detach().clone())
    weight = models.text_encoder.get_input_embeddings().weight
    before = weight.detach().clone()
    assert torch.equal(before[token_id], before[init])

    learned = inversion_stage(models, token_id, sorted(tmp_path.glob("*.png")), OBJECT_TEMPLATES, "token_testabcd",
                              InversionSettings(steps=3, lr=5e-2, resolution=64), StageLoop(tmp_path, "inv", 3, 0, 1000))
    after = models.text_encoder.get_input_embeddings().weight.detach()
    moved = (after != before).any(dim=1).nonzero().flatten().tolist()
    assert moved == [token_id]
    assert torch.equal(after[token_id], learned)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_inversion_regresses_onto_the_schedulers_training_target(tiny_v_pipe, prediction_type, tmp_path, monkeypatch):
    """Noise for an epsilon model, get_velocity(latents_0, noise, t) for a v model (SD 2.x 768)."""
    from diffusers import DDIMScheduler
    from PIL import Image

    from recare_cli.builtins.concept_types import OBJECT_TEMPLATES
    from recare_cli.erase.context import EraseModels
    from recare_cli.erase.inversion import InversionSettings, add_token, initializer_id, inversion_stage
    from recare_cli.erase.loop import StageLoop

    pipe = copy.deepcopy(tiny_v_pipe)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, prediction_type=prediction_type)
    models = EraseModels.from_pipeline(pipe, "cpu")
    Image.fromarray(np.full((48, 40, 3), 90, dtype=np.uint8)).save(tmp_path / "0.png")
    init_row = models.text_encoder.get_input_embeddings().weight[initializer_id(models.tokenizer, "person")]
    token_id = add_token(models, "token_testvpred", init_row.detach().clone())

    seen = {}  # what the step noised, what the UNet answered, the loss it reported
    add_noise, predict = models.scheduler.add_noise, models.eps
    monkeypatch.setattr(models.scheduler, "add_noise", lambda x0, noise, t: seen.update(x0=x0, noise=noise, t=t)
                        or add_noise(x0, noise, t))
    monkeypatch.setattr(models, "eps", lambda *a, **kw: seen.setdefault("out", predict(*a, **kw)))
    loop = StageLoop(tmp_path, "inv", 1, 0, 1000)
    monkeypatch.setattr(loop, "step_done", lambda step, **losses: seen.update(loss=losses["loss"].item()))
    inversion_stage(models, token_id, [tmp_path / "0.png"], OBJECT_TEMPLATES, "token_testvpred",
                    InversionSettings(steps=1, lr=5e-3, resolution=64), loop)

    out = seen["out"].detach()
    velocity = models.scheduler.get_velocity(seen["x0"], seen["noise"], seen["t"])
    target = velocity if prediction_type == "v_prediction" else seen["noise"]
    other = seen["noise"] if prediction_type == "v_prediction" else velocity
    assert seen["loss"] == pytest.approx(torch.nn.functional.mse_loss(out, target).item(), rel=1e-5)
    assert seen["loss"] != pytest.approx(torch.nn.functional.mse_loss(out, other).item(), rel=1e-3)


def test_initializer_must_be_one_token(models):
    from recare_cli.erase.inversion import initializer_id
    from recare_cli.errors import UsageError

    assert isinstance(initializer_id(models.tokenizer, "person"), int)
    with pytest.raises(UsageError, match="not one"):
        initializer_id(models.tokenizer, "a person")


def _inversion_run(models, tmp_path, name: str):
    from PIL import Image

    from recare_cli.builtins.concept_types import OBJECT_TEMPLATES
    from recare_cli.erase.inversion import InversionSettings, add_token, initializer_id, inversion_stage
    from recare_cli.erase.loop import StageLoop

    folder = tmp_path
    folder.mkdir()
    for i in range(2):
        Image.fromarray(np.full((48, 40, 3), 60 * i + 30, dtype=np.uint8)).save(folder / f"{i}.png")
    init = models.text_encoder.get_input_embeddings().weight[initializer_id(models.tokenizer, "person")]
    token_id = add_token(models, name, init.detach().clone())
    return inversion_stage(models, token_id, sorted(folder.glob("*.png")), OBJECT_TEMPLATES, name,
                           InversionSettings(steps=3, lr=5e-2, resolution=64), StageLoop(folder, "inv", 3, 0, 1000))


def test_inversion_gives_the_unet_no_gradients_and_learns_what_a_frozen_unet_learns(tiny_pipe, tmp_path, monkeypatch):
    from recare_cli.erase.context import EraseModels
    from recare_cli.erase.loop import StageLoop
    from recare_cli.erase.params import select_trainable

    # As in a run: the erase stage left its weights trainable when the inversion starts.
    models = EraseModels.from_pipeline(copy.deepcopy(tiny_pipe), "cpu")
    trainable = select_trainable(models.unet, "noxattn")
    holds_grad = []  # after each inversion step's backward: does any UNet weight hold a gradient?
    step_done = StageLoop.step_done
    monkeypatch.setattr(StageLoop, "step_done", lambda self, step, **losses: (
        holds_grad.append(any(p.grad is not None for p in models.unet.parameters())), step_done(self, step, **losses)))
    learned = _inversion_run(models, tmp_path / "a", "token_gradabcd")
    assert holds_grad == [False, False, False]
    assert all(p.requires_grad for p in trainable.values())  # the next erase round trains them again

    # The same inversion through a UNet with every weight frozen learns the very same row.
    frozen = EraseModels.from_pipeline(copy.deepcopy(tiny_pipe), "cpu")
    assert torch.equal(_inversion_run(frozen, tmp_path / "b", "token_gradabcd"), learned)


def test_stage2_regresses_on_the_compositional_target_and_the_frozen_retain(tiny_pipe, models, monkeypatch):
    """recare-method.md §5, computed here straight through diffusers: the erase prompt's prediction
    goes to eps('') + (S-1)(eps(a) - eps('')) + mean_j (-S-1)(eps(e_j) - eps('')), the retain prompt's
    stays at its frozen prediction, and the loss is their sum (lambda = 1)."""
    import recare_cli.erase.stage2 as stage2
    from recare_cli.erase.params import select_trainable
    from recare_cli.erase.stage1 import EraseSettings

    erase, anchor, retain, scale = ["a cat", "a dog"], "a tree", "a photo of a tree", 3.0
    draws, draw_args, regressions = record_training(monkeypatch, stage2)
    loop = RecordingLoop()
    settings = EraseSettings(iterations=2, lr=3.5e-4, guidance_scale=scale, resolution=64, prefix_steps=1)
    stage2.robust_erase_stage(models, select_trainable(models.unet, "xattn"), erase, [anchor], [retain], settings, loop)
    assert draw_args == [(64, 1)] * 2  # the partial denoising at the stage's resolution and prefix steps

    (latents_k, t), [(eps_theta_e, erase_target), (eps_theta_r, retain_target)] = draws[0], regressions[:2]
    eps = unet_eps(tiny_pipe, latents_k, t, [*erase, anchor, retain, ""])
    drawn = next(e for e in erase if torch.allclose(eps_theta_e, eps[e], atol=1e-5))
    expected = (eps[""] + (scale - 1) * (eps[anchor] - eps[""])
                + sum((-scale - 1) * (eps[e] - eps[""]) for e in erase) / len(erase))
    assert drawn in erase and torch.allclose(erase_target, expected, atol=1e-5)
    assert torch.allclose(eps_theta_r, eps[retain], atol=1e-5) and torch.allclose(retain_target, eps[retain], atol=1e-5)
    # Against the target the stage used (checked against `expected` above): the loss is ~1e-7 here,
    # so the 1e-6 rounding between batch sizes would move it by more than the tolerance.
    assert loop.losses[0]["erase_loss"] == pytest.approx(float(((eps_theta_e - erase_target) ** 2).mean()), rel=1e-4)
    step = loop.losses[1]  # the weights have moved: the retain loss is no longer 0
    assert step["retain_loss"] > 0 and step["loss"] == pytest.approx(step["erase_loss"] + step["retain_loss"], rel=1e-6)
    # AdamW (the reference's optimizer for both stages) at the stage's own rate, not torch's default 1e-3
    assert type(loop.optimizer) is torch.optim.AdamW and loop.optimizer.defaults["lr"] == 3.5e-4


def test_stage1_regresses_on_the_single_negative_target_of_the_stages_frozen_weights(tiny_pipe, models, monkeypatch):
    """recare-method.md §4.1 with g = 3, computed straight through diffusers: eps(c) - (g-1)(eps(c) - eps(''))."""
    import recare_cli.erase.stage1 as stage1
    from recare_cli.erase.params import select_trainable

    concept, g = "a cat", 3.0
    draws, draw_args, regressions = record_training(monkeypatch, stage1)
    loop = RecordingLoop()
    settings = stage1.EraseSettings(iterations=2, lr=3.5e-4, guidance_scale=g, resolution=64, prefix_steps=1)
    stage1.erase_stage(models, select_trainable(models.unet, "xattn"), [concept], settings, loop)
    assert draw_args == [(64, 1)] * 2  # the partial denoising at the stage's resolution and prefix steps

    for step, ((latents_k, t), (eps_theta, target)) in enumerate(zip(draws, regressions, strict=True)):
        eps = unet_eps(tiny_pipe, latents_k, t, [concept, ""])  # the frozen weights: the stage's starting ones
        assert torch.allclose(target, eps[concept] - (g - 1) * (eps[concept] - eps[""]), atol=1e-5)
        if step == 0:  # the trained prediction is the concept's, from the weights as they stand
            assert torch.allclose(eps_theta, eps[concept], atol=1e-5)
    assert type(loop.optimizer) is torch.optim.AdamW and loop.optimizer.defaults["lr"] == 3.5e-4


@pytest.mark.parametrize("momentum", [0.0, 0.5])
def test_stage2_keeps_one_momentum_buffer_per_condition_when_asked(models, monkeypatch, momentum):
    """--apg-momentum reaches stage 2: one buffer per erase concept and one for the anchor, the same
    buffers at every step and in the checkpoint; none without momentum."""
    import recare_cli.erase.stage2 as stage2
    from recare_cli.erase.guidance import GuidanceKnobs, MomentumBuffer
    from recare_cli.erase.params import select_trainable
    from recare_cli.erase.stage1 import EraseSettings

    seen = []
    real = stage2.compositional_target
    monkeypatch.setattr(stage2, "compositional_target",
                        lambda *a, **k: seen.append(a[4] if len(a) > 4 else k.get("buffers")) or real(*a, **k))
    loop = RecordingLoop()
    settings = EraseSettings(iterations=2, lr=1e-4, resolution=64, prefix_steps=1, knobs=GuidanceKnobs(momentum=momentum))
    stage2.robust_erase_stage(models, select_trainable(models.unet, "xattn"), ["a cat", "a dog"], ["a tree"],
                              ["a photo of a tree"], settings, loop)
    resumed = loop.buffers
    if momentum == 0:
        assert seen == [None, None] and resumed == [None]
        return
    buffers = seen[0]
    assert len(buffers) == 3 and all(isinstance(b, MomentumBuffer) and b.momentum == momentum for b in buffers)
    assert seen[1] is buffers and resumed == [buffers]
    assert all(b.running_average is not None for b in buffers)  # each condition's direction was accumulated


@pytest.mark.parametrize("momentum", [0.0, 0.5])
def test_stage1_keeps_its_momentum_buffer_when_asked(models, monkeypatch, momentum):
    """--apg-momentum reaches stage 1: one buffer, used at every step and restored on resume; none without."""
    import recare_cli.erase.stage1 as stage1
    from recare_cli.erase.guidance import GuidanceKnobs, MomentumBuffer
    from recare_cli.erase.params import select_trainable

    seen = []
    real = stage1.single_negative_target
    monkeypatch.setattr(stage1, "single_negative_target",
                        lambda *a, **k: seen.append(a[4] if len(a) > 4 else k.get("buffer")) or real(*a, **k))
    loop = RecordingLoop()
    settings = stage1.EraseSettings(iterations=2, lr=1e-4, resolution=64, prefix_steps=1,
                                    knobs=GuidanceKnobs(momentum=momentum))
    stage1.erase_stage(models, select_trainable(models.unet, "xattn"), ["a cat"], settings, loop)
    if momentum == 0:
        assert seen == [None, None] and loop.buffers == [None]
        return
    buffer = seen[0]
    assert isinstance(buffer, MomentumBuffer) and buffer.momentum == momentum and buffer.running_average is not None
    assert seen[1] is buffer and loop.buffers == [[buffer]]
