"""The erase stages' shared pieces on tiny-random: how the models are loaded and called (context.py)
and the textual inversion's tokens, images and steps (inversion.py)."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from stage_spies import RecordingLoop


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


def test_models_load_the_given_unet_weights(tiny_model, tiny_pipe, tmp_path):
    """An attack on an erased model (`eval --unet … --attack`) loads it through EraseModels.load."""
    from safetensors.torch import save_file

    from recare_cli.erase.context import EraseModels
    from recare_cli.models import Runtime

    erased = {k: v + 0.01 for k, v in tiny_pipe.unet.state_dict().items()}
    save_file(erased, str(tmp_path / "erased.safetensors"))
    models = EraseModels.load(Runtime("tiny-random", device="cpu"), str(tmp_path / "erased.safetensors"))
    assert all(torch.equal(v, erased[k]) for k, v in models.unet.state_dict().items())


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


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_eps_under_autocast_computes_in_its_dtype_and_answers_in_fp32(models, dtype):
    models.autocast_dtype = dtype
    seen = []
    models.unet.conv_in.register_forward_hook(lambda module, args, output: seen.append(output.dtype))
    out = models.eps(torch.randn(1, 4, 8, 8), 500, models.embed(["a cat"]))
    assert seen == [dtype] and out.dtype == torch.float32
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


def test_encode_with_rows_is_encode_with_those_rows_written_into_the_matrix(models):
    """Two slots, two prompts (one without any slot), each slot twice in a prompt: the same states as
    when the rows are in the matrix; the gradient reaches the given rows; the matrix is never touched."""
    slots = torch.tensor([9000, 9001])
    ids = models.token_ids(["x y x photo", "a photo of a cat"])
    ids[0, 1:4] = torch.tensor([9000, 9001, 9000])
    values = torch.randn(2, 32, requires_grad=True)
    matrix = models.text_encoder.get_input_embeddings().weight
    before = matrix.detach().clone()

    swapped = models.encode_ids([ids], [(slots, values)])
    assert torch.equal(matrix.detach(), before)
    written = before.clone()
    written[slots] = values.detach()
    with torch.no_grad():
        matrix.copy_(written)
        expected = models.encode_ids([ids])
        matrix.copy_(before)
    assert torch.allclose(swapped, expected, atol=1e-6)
    assert not torch.allclose(swapped[0], models.encode_ids([ids])[0], atol=1e-3)
    assert torch.equal(swapped[1], models.encode_ids([ids])[1])  # no slot in it

    swapped[0].sum().backward()
    assert values.grad is not None and values.grad.abs().sum(dim=1).gt(0).all()
    assert matrix.grad is None


def test_replaced_rows_leave_the_encoder_as_it_was_even_after_an_error(models):
    from recare_cli.erase.context import replaced_rows

    ids = models.token_ids(["a photo of a cat"])
    plain = models.encode_ids([ids])
    with pytest.raises(RuntimeError):
        with replaced_rows(models.text_encoder, ids, ids[0, 1:2], torch.zeros(1, 32)):
            assert not torch.equal(models.encode_ids([ids]), plain)
            raise RuntimeError
    assert torch.equal(models.encode_ids([ids]), plain)


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
    with pytest.raises(UsageError, match=r"'a person' is 2 tokens for this tokenizer \(a</w> person</w>\), not one") as caught:
        initializer_id(models.tokenizer, "a person")
    assert caught.value.hint == "pick a single common word such as person, art or object"
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
    with pytest.raises(RecareError, match=rf"token 'token_abcdefgh' got different ids .*\[{first}, {first + 1}\]") as caught:
        add_token(models, "token_abcdefgh", torch.zeros(2 * width))
    assert caught.value.hint == "the tokenizers of this model do not share one vocabulary"


def test_round_subset_takes_consecutive_chunks_and_wraps():
    from recare_cli.erase.inversion import round_subset

    images = [Path(f"{i}.png") for i in range(5)]
    assert [round_subset(images, 2, r) for r in range(3)] == [images[0:2], images[2:4], [images[4], images[0]]]
    assert [round_subset(images, 7, r) for r in (0, 4, 6)] == [[images[0]], [images[4]], [images[1]]]  # chunks of 1


def _bands(path: Path, shape: tuple[int, int], axis: int) -> None:
    """An image in three bands (red, green, blue) along `axis` (1: left to right, 0: top to bottom)."""
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


@pytest.mark.parametrize("size", [(11, 8), (8, 11)])
def test_load_pixels_cuts_the_extra_pixel_of_an_odd_margin_after_the_image(tmp_path, size):
    from recare_cli.erase.inversion import load_pixels

    width, height = size
    index = np.arange(max(size)) * 20  # red = 20 × the column (or row) number
    red = np.broadcast_to(index[None, :width] if width > height else index[:height, None], (height, width))
    Image.fromarray(np.stack([red, np.zeros_like(red), np.zeros_like(red)], -1).astype(np.uint8)).save(tmp_path / "odd.png")
    first = load_pixels(tmp_path / "odd.png", 8, center_crop=True)[0]
    kept = first[0] if width > height else first[:, 0]  # margin 3: one column (row) cut before, two after
    assert torch.allclose(kept, torch.tensor(index[1:9] / 127.5 - 1, dtype=torch.float32))


@pytest.mark.parametrize("mode,fill", [("L", 255), ("RGBA", (0, 255, 0, 128))])
def test_load_pixels_makes_every_image_three_rgb_channels(tmp_path, mode, fill):
    from recare_cli.erase.inversion import load_pixels

    Image.new(mode, (6, 6), fill).save(tmp_path / "image.png")
    pixels = load_pixels(tmp_path / "image.png", 4, center_crop=False)
    expected = [1.0, 1.0, 1.0] if mode == "L" else [-1.0, 1.0, -1.0]  # alpha dropped, not blended
    assert pixels.shape == (3, 4, 4) and torch.equal(pixels, torch.tensor(expected).view(3, 1, 1).expand(3, 4, 4))


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


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_the_inversion_regresses_on_what_the_scheduler_was_trained_to_predict(prediction_type):
    from diffusers import DDIMScheduler

    from recare_cli.erase.inversion import training_target

    scheduler = DDIMScheduler(prediction_type=prediction_type)
    latents_0, noise, timesteps = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8), torch.tensor([300])
    expected = {"epsilon": noise, "sample": latents_0,
                "v_prediction": scheduler.get_velocity(latents_0, noise, timesteps)}[prediction_type]
    assert torch.equal(training_target(scheduler, latents_0, noise, timesteps), expected)


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
    loop = RecordingLoop()
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
    assert loop.steps == list(range(steps)) and loop.loss_shapes == [{"loss": ()}] * steps  # each step's loss reported
    # AdamW at the settings' rate on the token row alone, which ends written into the text encoder
    assert type(loop.optimizer) is torch.optim.AdamW and loop.optimizer.defaults["lr"] == 7e-3
    (row,) = loop.optimizer.param_groups[0]["params"]
    assert torch.equal(row.detach(), learned)
    assert torch.equal(models.text_encoder.get_input_embeddings().weight[token_id], learned)
