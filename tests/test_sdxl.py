"""SDXL on `tiny-random-xl`: detection from contents, conditioning as diffusers builds it, both text
encoders in textual inversion, block names, the fp32 VAE. (Every command on it: test_model_families.)"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from recare_cli import models as model_loading


@pytest.fixture
def xl_models(tiny_xl_pipe):
    from recare_cli.erase.context import EraseModels

    return EraseModels.from_pipeline(copy.deepcopy(tiny_xl_pipe), "cpu")


# loading --------------------------------------------------------------------------------------

def _copy_model(folder: Path, target: Path) -> Path:
    shutil.copytree(folder, target, ignore=shutil.ignore_patterns("recare-builtin.json"))
    return target


def test_family_is_read_from_the_folder_not_its_name(tmp_path, cache_dir):
    xl = _copy_model(model_loading.builtin_path("tiny-random-xl", cache_dir), tmp_path / "stable-diffusion-v1-5")
    sd = _copy_model(model_loading.builtin_path("tiny-random", cache_dir), tmp_path / "my-sdxl-model")
    for folder, expected in ((xl, "StableDiffusionXLPipeline"), (sd, "StableDiffusionPipeline")):
        ref = model_loading.resolve_model(str(folder))
        assert model_loading.pipeline_class_name(ref) == expected
        assert type(model_loading.load_pipeline(ref)).__name__ == expected


def test_single_file_family_is_read_from_its_keys(tiny_xl_pipe, tiny_pipe, tmp_path):
    from safetensors.torch import save_file

    from recare_cli.export import pipeline_to_ldm

    for pipe, name, expected in ((tiny_xl_pipe, "sd15.safetensors", "StableDiffusionXLPipeline"),
                                 (tiny_pipe, "sdxl.safetensors", "StableDiffusionPipeline")):
        path = tmp_path / name
        save_file({k: v.contiguous() for k, v in pipeline_to_ldm(pipe).items()}, str(path))
        assert model_loading.pipeline_class_name(model_loading.resolve_model(str(path))) == expected


def test_hub_id_and_single_file_load_offline_from_the_hf_cache(tmp_path, cache_dir, tiny_xl_pipe, run_cli,
                                                               monkeypatch):
    """An SDXL hub id from the real cache layout; a single file whose configs diffusers finds there."""
    from safetensors.torch import save_file

    from recare_cli.export import pipeline_to_ldm
    from tests.test_models import add_to_hub_cache

    home = tmp_path / "hf-home"
    add_to_hub_cache(home, "stabilityai/stable-diffusion-xl-base-1.0", model_loading.builtin_path("tiny-random-xl", cache_dir))
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    single = tmp_path / "some-checkpoint.safetensors"
    save_file({k: v.contiguous() for k, v in pipeline_to_ldm(tiny_xl_pipe).items()}, str(single))

    for model in ("stabilityai/stable-diffusion-xl-base-1.0", str(single)):
        pipe, ref, _ = model_loading.Runtime(model, device="cpu", offline=True).pipeline()
        assert type(pipe).__name__ == "StableDiffusionXLPipeline", ref.kind
        for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
            expected = getattr(tiny_xl_pipe, name).state_dict()
            assert all(torch.equal(getattr(pipe, name).state_dict()[k], v) for k, v in expected.items()), (model, name)
    result = run_cli("generate", "--model", single, "--device", "cpu", "--height", "64", "--width", "64",
                     "--steps", "2", "--offline", "-p", "a cat", "--quiet", "--output-dir", tmp_path / "out")
    assert result.exit_code == 0, result.stderr
    assert Image.open(tmp_path / "out" / "a_cat_0.png").size == (64, 64)


# conditioning -----------------------------------------------------------------------------------

def test_conditioning_is_what_the_sdxl_pipeline_builds(xl_models, tiny_xl_pipe):
    prompts = ["a photo of a cat", ""]
    latents = torch.zeros(2, 4, 12, 10)
    prompt_embeds, added = xl_models.condition(latents, xl_models.embed(prompts))
    expected_embeds, _, expected_pooled, _ = tiny_xl_pipe.encode_prompt(prompts, device="cpu",
                                                                        do_classifier_free_guidance=False)
    assert torch.allclose(prompt_embeds, expected_embeds, atol=1e-6)
    assert torch.allclose(added["text_embeds"], expected_pooled, atol=1e-6)
    # height 96, width 80 px: diffusers' default original size = target size, no crop
    expected_ids = tiny_xl_pipe._get_add_time_ids((96, 80), (0, 0), (96, 80), dtype=torch.float32,
                                                  text_encoder_projection_dim=48)
    assert torch.equal(added["time_ids"], expected_ids.expand(2, -1))


def test_every_unet_call_of_both_stages_gets_pooled_embeds_and_time_ids(xl_models, tmp_path, monkeypatch):
    from recare_cli.erase.loop import StageLoop
    from recare_cli.erase.params import select_trainable
    from recare_cli.erase.stage1 import EraseSettings, erase_stage
    from recare_cli.erase.stage2 import robust_erase_stage

    calls = []
    monkeypatch.setattr(xl_models, "traces", None)  # a traced call would run no hook
    xl_models.unet.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append((args[0].shape[0], kwargs.get("added_cond_kwargs"))), with_kwargs=True)
    trainable = select_trainable(xl_models.unet, "xattn")
    settings = EraseSettings(iterations=1, lr=1e-4, resolution=64, prefix_steps=2)
    erase_stage(xl_models, trainable, ["a cat"], settings, StageLoop(tmp_path, "erase-0", 1, 0, 1000))
    robust_erase_stage(xl_models, trainable, ["a cat"], ["a dog"], ["a tree"], settings,
                       StageLoop(tmp_path, "robust", 1, 0, 1000))
    assert len(calls) >= 6  # prefix, frozen and trained predictions of each stage
    for batch, added in calls:
        assert added["text_embeds"].shape == (batch, 48) and added["time_ids"].shape == (batch, 6)
        assert added["time_ids"][0].tolist() == [64, 64, 0, 0, 64, 64]


def test_inversion_learns_the_token_in_both_text_encoders(xl_models, tmp_path):
    from recare_cli.builtins.concept_types import OBJECT_TEMPLATES
    from recare_cli.erase.inversion import (
        InversionSettings, add_token, initializer_id, inversion_stage, split_rows, token_embedding,
    )
    from recare_cli.erase.loop import StageLoop

    Image.fromarray(np.full((48, 40, 3), 120, dtype=np.uint8)).save(tmp_path / "0.png")
    init = initializer_id(xl_models.tokenizer, "person")
    token_id = add_token(xl_models, "token_testxlab", token_embedding(xl_models, init).clone())
    assert xl_models.tokenizer_2.convert_tokens_to_ids("token_testxlab") == token_id
    tables = [encoder.get_input_embeddings().weight for encoder, _ in xl_models.text_encoders]
    before = [table.detach().clone() for table in tables]
    learned = inversion_stage(xl_models, token_id, [tmp_path / "0.png"], OBJECT_TEMPLATES, "token_testxlab",
                              InversionSettings(steps=2, lr=5e-2, resolution=64), StageLoop(tmp_path, "inv", 2, 0, 1000))
    assert learned.shape == (32 + 48,)
    for table, old, row in zip(tables, before, split_rows(xl_models, learned)):
        moved = (table.detach() != old).any(dim=1).nonzero().flatten().tolist()
        assert moved == [token_id]  # each encoder learned the token, and nothing else
        assert torch.equal(table[token_id].detach(), row)


def test_a_run_stores_and_reloads_both_rows(tiny_xl_pipe, tmp_path):
    from safetensors import safe_open

    from recare_cli.learned_tokens import add_learned_tokens, learned_tokens_tensors
    from safetensors.torch import save_file

    rows = {"token_aaaa": [torch.randn(32), torch.randn(48)], "token_bbbb": [torch.randn(32), torch.randn(48)]}
    path = tmp_path / "tokens.safetensors"
    save_file(learned_tokens_tensors(rows), str(path), metadata={"tokens": json.dumps(list(rows))})
    with safe_open(str(path), framework="pt") as handle:
        assert {k: tuple(handle.get_tensor(k).shape) for k in handle.keys()} == {"clip_l": (2, 32), "clip_g": (2, 48)}
    pipe = copy.deepcopy(tiny_xl_pipe)
    assert add_learned_tokens(pipe, path) == list(rows)
    for i, (encoder, tokenizer) in enumerate(((pipe.text_encoder, pipe.tokenizer), (pipe.text_encoder_2, pipe.tokenizer_2))):
        for name, token_rows in rows.items():
            assert torch.equal(encoder.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids(name)].detach(),
                               token_rows[i])


# block names, precision ---------------------------------------------------------------------------

def test_train_methods_select_sdxl_blocks(tiny_xl_pipe):
    from recare_cli.erase.params import trainable_parameter_names

    unet = tiny_xl_pipe.unet
    xattn = trainable_parameter_names(unet, "xattn")
    assert xattn and all(".attn2." in n for n in xattn)
    assert any(".transformer_blocks.1.attn2." in n for n in xattn)  # SDXL's deeper transformers
    noxattn = trainable_parameter_names(unet, "noxattn")
    assert "add_embedding.linear_1.weight" in noxattn and not any("attn2" in n for n in noxattn)
    strict = trainable_parameter_names(unet, "xattn-strict")
    assert strict and all(n.rsplit(".", 2)[-2] in ("to_k", "to_v") for n in strict)


def test_vae_stays_float32_under_autocast_when_it_must(xl_models, tmp_path):
    """SDXL's VAE overflows in fp16 (force_upcast): the latent cache encodes in float32 even under autocast."""
    from recare_cli.erase.inversion import InversionSettings, LatentCache

    Image.fromarray(np.full((48, 40, 3), 120, dtype=np.uint8)).save(tmp_path / "0.png")
    xl_models.autocast_dtype = torch.bfloat16
    dtypes = []
    xl_models.vae.encoder.conv_in.register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
    LatentCache(xl_models, [tmp_path / "0.png"], InversionSettings(resolution=64)).distribution(0, False)
    assert dtypes == [torch.float32]
    xl_models.vae.config.force_upcast = False  # a VAE that may run in half precision does
    LatentCache(xl_models, [tmp_path / "0.png"], InversionSettings(resolution=64)).distribution(0, False)
    assert dtypes[-1] == torch.bfloat16


def test_gradient_checkpointing_trains_the_same_weights(tiny_xl_pipe, tmp_path):
    from recare_cli.erase.context import EraseModels
    from recare_cli.erase.loop import StageLoop
    from recare_cli.erase.params import select_trainable
    from recare_cli.erase.stage1 import EraseSettings, erase_stage

    trained = []
    for checkpointing in (False, True):
        pipe = copy.deepcopy(tiny_xl_pipe)
        if checkpointing:
            pipe.unet.enable_gradient_checkpointing()
        xl = EraseModels.from_pipeline(pipe, "cpu")
        trainable = select_trainable(xl.unet, "xattn")
        erase_stage(xl, trainable, ["a cat"], EraseSettings(iterations=1, lr=1e-3, resolution=64, prefix_steps=1),
                    StageLoop(tmp_path, f"erase-{checkpointing}", 1, 0, 1000))
        assert xl.unet.is_gradient_checkpointing == checkpointing
        trained.append({k: v.detach().clone() for k, v in trainable.items()})
    assert all(torch.allclose(trained[0][k], trained[1][k], atol=1e-6) for k in trained[0])
    assert any(not torch.equal(trained[0][k], tiny_xl_pipe.unet.state_dict()[k]) for k in trained[0])


# UCE ----------------------------------------------------------------------------------------------

def test_uce_edits_every_cross_attention_to_the_closed_form_on_the_sdxl_context(run_cli, tiny_xl_pipe, tmp_path):
    """c is what the SDXL UNet's cross-attention reads (diffusers' encode_prompt: both encoders, 32 + 48 wide)
    at the prompt's last token; each edited K/V weight is the least-squares minimiser, solved here on its own."""
    from safetensors.torch import load_file

    out = tmp_path / "uce"
    result = run_cli("erase", "--concept", "nudity", "--model", "tiny-random-xl", "--device", "cpu", "--method", "uce",
                     "--preserve", "man", "--preserve", "a tree", "--output-dir", out, "--quiet")
    assert result.exit_code == 0, result.stderr
    edited = load_file(str(out / "unet.safetensors"))

    def context_at_last_token(prompts: list[str]) -> torch.Tensor:
        embeds, _, _, _ = tiny_xl_pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
        last = [len(tiny_xl_pipe.tokenizer(p).input_ids) - 2 for p in prompts]  # before end-of-text; "": start
        return embeds[torch.arange(len(prompts)), last].double()

    erase_c, guide_c, keep_c = (context_at_last_token(p) for p in (["nudity"], [""], ["man", "a tree"]))
    assert erase_c.shape == (1, 80)
    lamb = 0.5  # uce_sd_erase.py's defaults: lamb 0.5, erase and preserve scales 1
    design = torch.cat([lamb ** 0.5 * torch.eye(80, dtype=torch.float64), erase_c, keep_c])
    original = tiny_xl_pipe.unet.state_dict()
    projections = [k for k in original if k.endswith(("attn2.to_k.weight", "attn2.to_v.weight"))]
    assert any(".transformer_blocks.1.attn2." in k for k in projections)  # SDXL's deeper transformers too
    for key in projections:
        w_old = original[key].double()
        wanted = torch.cat([lamb ** 0.5 * w_old.T, guide_c @ w_old.T, keep_c @ w_old.T])
        expected = torch.linalg.lstsq(design, wanted).solution.T
        assert torch.allclose(edited[key].double(), expected, atol=1e-5), key
    assert all(torch.equal(edited[k], v) for k, v in original.items() if k not in projections)


# generate -----------------------------------------------------------------------------------------

def test_generate_draws_at_the_models_default_size_with_diffusers_size_conditioning(run_cli, tiny_xl_pipe, tmp_path,
                                                                                   monkeypatch):
    """No --height/--width: the UNet's sample size times the VAE's scale factor (1024 px, as for SDXL base),
    and the UNet told original size = target size = 1024, no crop."""
    assert tiny_xl_pipe.default_sample_size * tiny_xl_pipe.vae_scale_factor == 1024  # this built-in is SDXL-sized
    time_ids = []
    load = model_loading.load_pipeline

    def load_and_watch(*args, **kwargs):
        pipe = load(*args, **kwargs)
        pipe.unet.register_forward_pre_hook(
            lambda module, a, kw: time_ids.append(kw["added_cond_kwargs"]["time_ids"].tolist()), with_kwargs=True)
        return pipe

    monkeypatch.setattr(model_loading.runtime, "load_pipeline", load_and_watch)  # where Runtime.pipeline finds it
    result = run_cli("generate", "--model", "tiny-random-xl", "--device", "cpu", "--steps", "1", "-p", "a cat",
                     "--quiet", "--output-dir", tmp_path / "out")
    assert result.exit_code == 0, result.stderr
    with Image.open(tmp_path / "out" / "a_cat_0.png") as image:
        assert image.size == (1024, 1024)
    assert time_ids == [[[1024, 1024, 0, 0, 1024, 1024]] * 2]  # one step, unconditional and conditional rows
