"""`recare export`: every format written from a tiny-random run, loaded back by the loader its users use."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

TOKENS = ["token_k3x9q0zv", "token_p2m7c4rd"]


def _json_result(result) -> dict:
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def _forward(unet) -> torch.Tensor:
    generator = torch.Generator().manual_seed(123)
    latents = torch.randn(1, 4, 16, 16, generator=generator)
    text = torch.randn(1, 77, unet.config.cross_attention_dim, generator=generator)
    with torch.no_grad():
        return unet.float()(latents, 250, encoder_hidden_states=text).sample


def _linear_and_conv_keys(unet) -> set[str]:
    return {f"{name}.{param}" for name, module in unet.named_modules()
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))
            for param in ("weight", "bias") if getattr(module, param, None) is not None}


def _perturbed(unet, seed: int = 7) -> dict:
    """What an erase run changes: Linear/Conv2d weights and biases, nothing else."""
    generator = torch.Generator().manual_seed(seed)
    trained = _linear_and_conv_keys(unet)
    return {k: (v + 0.02 * torch.randn(v.shape, generator=generator) if k in trained else v.clone())
            for k, v in unet.state_dict().items()}


def _write_run(run_dir: Path, unet_state: dict, method: str = "recare", model: str = "tiny-random",
               tokens: list[str] | None = TOKENS, hidden: int = 32, model_as_typed: bool = False) -> Path:
    """A run directory as `recare erase` writes it (unet.safetensors, tokens.safetensors, manifest).

    The manifest's "model" is the resolved model record erase writes, or (`model_as_typed`) the bare spec.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    meta = {"concept": "nudity", "method": method, "base_model": model, "recare_version": "0.1.0"}
    save_file({k: v.contiguous() for k, v in unet_state.items()}, str(run_dir / "unet.safetensors"), metadata=meta)
    if tokens:
        generator = torch.Generator().manual_seed(3)
        save_file({t: torch.randn(hidden, generator=generator) for t in tokens}, str(run_dir / "tokens.safetensors"),
                  metadata={"tokens": json.dumps(tokens), "initializer": "person"})
    record = model if model_as_typed else {"model": model, "kind": "builtin", "path": "/elsewhere", "revision": None}
    (run_dir / "recare-run.json").write_text(json.dumps({"method": method, "concepts": ["nudity"], "model": record}))
    return run_dir


@pytest.fixture(scope="module")
def erased_state(tiny_pipe) -> dict:
    return _perturbed(tiny_pipe.unet)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, erased_state) -> Path:
    return _write_run(tmp_path_factory.mktemp("runs") / "nudity", erased_state)


def _assert_same_state(actual: dict, expected: dict) -> None:
    assert set(actual) == set(expected)
    for key, value in expected.items():
        assert torch.equal(actual[key].float(), value.float()), key


# formats ------------------------------------------------------------------------------------

def test_unet_export_is_the_erased_state_dict_with_metadata(run_cli, run_dir, erased_state, tmp_path):
    out = tmp_path / "erased-unet.safetensors"
    data = _json_result(run_cli("export", run_dir, "--format", "unet", "--output", out, "--json"))
    assert data["max_abs_diff"] == 0.0 and data["tolerance"] > 0
    assert data["base_model"] == "tiny-random"  # from the run's manifest: no --model given
    _assert_same_state(load_file(str(out)), erased_state)
    with safe_open(str(out), framework="pt") as handle:
        meta = handle.metadata()
    assert (meta["concept"], meta["method"], meta["base_model"]) == ("nudity", "recare", "tiny-random")
    assert meta["recare_version"]


def test_diffusers_export_loads_with_from_pretrained(run_cli, run_dir, erased_state, tiny_pipe, tmp_path):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "erased-pipeline"
    data = _json_result(run_cli("export", run_dir, "--format", "diffusers", "--output", out, "--json"))
    pipe = StableDiffusionPipeline.from_pretrained(out, safety_checker=None, requires_safety_checker=False)
    _assert_same_state(pipe.unet.state_dict(), erased_state)
    _assert_same_state(pipe.vae.state_dict(), tiny_pipe.vae.state_dict())
    card = (out / "README.md").read_text()
    assert "nudity" in card and "tiny-random" in card and "recare" in card
    assert str(out / "README.md") in data["files"]
    with safe_open(str(out / "unet" / "diffusion_pytorch_model.safetensors"), framework="pt") as handle:
        assert handle.metadata()["concept"] == "nudity"


def test_diffusers_fp16_export_writes_a_variant_within_the_looser_tolerance(run_cli, run_dir, erased_state, tmp_path):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "erased-fp16"
    data = _json_result(run_cli("export", run_dir, "-f", "diffusers", "-o", out, "--dtype", "fp16", "--json"))
    assert (out / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    pipe = StableDiffusionPipeline.from_pretrained(out, variant="fp16", torch_dtype=torch.float16,
                                                   safety_checker=None, requires_safety_checker=False)
    assert pipe.unet.dtype == torch.float16
    _assert_same_state(pipe.unet.state_dict(), {k: v.half() for k, v in erased_state.items()})
    # Rounding to fp16 moves the prediction a little: more than fp32's tolerance, less than fp16's.
    assert 1e-4 < data["max_abs_diff"] <= data["tolerance"]


def test_single_file_sd1_loads_through_diffusers_single_file_loader(run_cli, run_dir, erased_state, tiny_pipe,
                                                                      tiny_model, tmp_path):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "erased-sd1.safetensors"
    _json_result(run_cli("export", run_dir, "--format", "single-file", "--output", out, "--json"))
    checkpoint = load_file(str(out))
    assert "model.diffusion_model.input_blocks.0.0.weight" in checkpoint
    assert "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" in checkpoint
    assert checkpoint["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4  # LDM holds it as a 1x1 conv
    assert all(k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer."))
               for k in checkpoint)

    pipe = StableDiffusionPipeline.from_single_file(str(out), config=str(tiny_model), local_files_only=True,
                                                    safety_checker=None, requires_safety_checker=False)
    _assert_same_state(pipe.unet.state_dict(), erased_state)
    _assert_same_state(pipe.vae.state_dict(), tiny_pipe.vae.state_dict())
    _assert_same_state(pipe.text_encoder.state_dict(), tiny_pipe.text_encoder.state_dict())


@pytest.fixture(scope="module")
def sd2_model(tmp_path_factory, tiny_model) -> Path:
    """tiny-random reshaped like SD 2.x: linear transformer projections and an OpenCLIP-style (gelu) text tower."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    base = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None, requires_safety_checker=False)
    torch.manual_seed(11)
    unet = UNet2DConditionModel.from_config({**base.unet.config, "use_linear_projection": True})
    text_encoder = CLIPTextModel(CLIPTextConfig(**{**base.text_encoder.config.to_dict(), "hidden_act": "gelu"}))
    folder = tmp_path_factory.mktemp("models") / "tiny-sd2"
    StableDiffusionPipeline(
        vae=base.vae, text_encoder=text_encoder, tokenizer=base.tokenizer, unet=unet, scheduler=base.scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    ).save_pretrained(folder)
    return folder


def test_single_file_sd2_uses_the_open_clip_layout(run_cli, sd2_model, tmp_path):
    from diffusers import StableDiffusionPipeline

    base = StableDiffusionPipeline.from_pretrained(sd2_model, safety_checker=None, requires_safety_checker=False)
    unet_file = tmp_path / "sd2-erased.safetensors"
    erased = _perturbed(base.unet, seed=9)
    save_file(erased, str(unet_file))  # a bare UNet file: the base comes from --model
    out = tmp_path / "erased-sd2.safetensors"
    data = _json_result(run_cli("export", unet_file, "--model", sd2_model, "-f", "single-file", "-o", out, "--json"))
    assert data["text_encoder_layout"] == "open_clip"
    checkpoint = load_file(str(out))
    fused = checkpoint["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"]
    assert fused.shape == (3 * 32, 32)
    assert "cond_stage_model.model.positional_embedding" in checkpoint

    pipe = StableDiffusionPipeline.from_single_file(str(out), config=str(sd2_model), local_files_only=True,
                                                    safety_checker=None, requires_safety_checker=False)
    _assert_same_state(pipe.unet.state_dict(), erased)
    _assert_same_state(pipe.text_encoder.state_dict(), base.text_encoder.state_dict())


@pytest.mark.filterwarnings("ignore:.*lora_bias=True.*")  # PEFT: bias-free layers cannot be merged; unused here
def test_full_rank_lora_reproduces_the_erased_unet(run_cli, run_dir, erased_state, tiny_pipe, tmp_path):
    out = tmp_path / "erased-lora.safetensors"
    result = run_cli("export", run_dir, "-f", "lora", "-o", out, "--rank", "4096", "--json")
    data = _json_result(result)
    assert data["relative_error"] < 1e-5 and data["not_representable"] == 0
    assert all(k.startswith("unet.") and ".lora_" in k for k in load_file(str(out)))
    # No layer of tiny-random is 4096 wide: the file, its header and the report say the rank it has.
    widest = max(v.shape[0] for k, v in load_file(str(out)).items() if k.endswith("lora_A.weight"))
    assert data["rank"] == widest < data["rank_asked"] == 4096
    with safe_open(str(out), framework="pt") as handle:
        assert handle.metadata()["rank"] == str(widest)
    human = run_cli("export", run_dir, "-f", "lora", "-o", tmp_path / "again.safetensors", "--rank", "4096")
    assert f"rank {widest} (--rank 4096: no changed layer is wider) over" in human.stdout

    pipe = copy.deepcopy(tiny_pipe)
    pipe.load_lora_weights(str(out))
    erased_unet = copy.deepcopy(tiny_pipe.unet)
    erased_unet.load_state_dict(erased_state)
    assert (_forward(pipe.unet) - _forward(erased_unet)).abs().max().item() < 1e-4
    assert (_forward(pipe.unet) - _forward(tiny_pipe.unet)).abs().max().item() > 1e-2  # it did change something


def test_low_rank_lora_reports_the_svd_tail_as_its_error(run_cli, run_dir, erased_state, tiny_pipe, tmp_path):
    out = tmp_path / "erased-lora-r2.safetensors"
    data = _json_result(run_cli("export", run_dir, "-f", "lora", "-o", out, "--rank", "2", "--json"))
    base = tiny_pipe.unet.state_dict()
    tail = total = 0.0
    for key in _linear_and_conv_keys(tiny_pipe.unet):
        if key.endswith(".weight"):
            delta = (erased_state[key] - base[key]).double().numpy().reshape(base[key].shape[0], -1)
            singular = np.linalg.svd(delta, compute_uv=False)
            tail += float((singular[2:] ** 2).sum())
            total += float((singular ** 2).sum())
    assert data["relative_error"] == pytest.approx((tail / total) ** 0.5, rel=1e-4)
    assert data["max_abs_diff_vs_source"] > data["max_abs_diff"]
    ranks = {v.shape[0] for k, v in load_file(str(out)).items() if k.endswith("lora_A.weight")}
    assert ranks == {2} and data["rank"] == data["rank_asked"] == 2


def test_tokens_export_loads_with_load_textual_inversion(run_cli, run_dir, tiny_pipe, tmp_path):
    out = tmp_path / "adversarial-tokens"
    data = _json_result(run_cli("export", run_dir, "-f", "tokens", "-o", out, "--json"))
    assert data["tokens"] == TOKENS
    assert (out / "README.md").is_file()
    learned = load_file(str(run_dir / "tokens.safetensors"))
    pipe = copy.deepcopy(tiny_pipe)
    pipe.load_textual_inversion([str(out / f"{t}.safetensors") for t in TOKENS])
    table = pipe.text_encoder.get_input_embeddings().weight
    for token in TOKENS:
        assert torch.equal(table[pipe.tokenizer.convert_tokens_to_ids(token)].detach(), learned[token])


def test_tokens_single_file_needs_a_single_token(run_cli, tmp_path, erased_state):
    two = _write_run(tmp_path / "two", erased_state)
    result = run_cli("export", two, "-f", "tokens", "-o", tmp_path / "t.safetensors")
    assert result.exit_code == 2 and "2 tokens" in result.stderr

    one = _write_run(tmp_path / "one", erased_state, tokens=TOKENS[:1], model_as_typed=True)
    out = tmp_path / "t.safetensors"
    data = _json_result(run_cli("export", one, "-f", "tokens", "-o", out, "--json"))
    assert list(load_file(str(out))) == TOKENS[:1] and data["base_model"] == "tiny-random"


def test_a_cache_name_is_a_source(run_cli, run_dir, erased_state, cache_dir, tmp_path):
    from recare_cli.cache import register_erased

    register_erased(cache_dir, "nudity-erased", run_dir, {"concept": "nudity"})
    out = tmp_path / "by-name.safetensors"
    result = run_cli("export", "nudity-erased", "-f", "unet", "-o", out)
    assert result.exit_code == 0, result.stderr
    assert f"→ {out}" in result.stdout and "max abs difference 0 " in result.stdout
    _assert_same_state(load_file(str(out)), erased_state)


# bad input ----------------------------------------------------------------------------------

def test_existing_output_is_refused_without_overwrite(run_cli, run_dir, tmp_path):
    out = tmp_path / "taken.safetensors"
    out.write_bytes(b"keep me")
    result = run_cli("export", run_dir, "-f", "unet", "-o", out)
    assert result.exit_code == 2
    assert "already exists" in result.stderr and "--overwrite" in result.stderr
    assert out.read_bytes() == b"keep me"


def test_run_without_weights_is_refused(run_cli, tmp_path):
    run = tmp_path / "unfinished"
    run.mkdir()
    (run / "recare-run.json").write_text(json.dumps({"method": "recare", "concepts": ["x"], "model": "tiny-random"}))
    result = run_cli("export", run, "-f", "unet", "-o", tmp_path / "x.safetensors")
    assert result.exit_code == 1 and "unet.safetensors" in result.stderr
    assert result.stderr.startswith("Error:") and "Traceback" not in result.stderr


def test_base_with_other_shapes_is_refused(run_cli, sd2_model, run_dir, tmp_path):
    # The SD2-shaped model holds proj_in/proj_out as Linear, tiny-random as 1x1 Conv2d.
    out = tmp_path / "x.safetensors"
    result = run_cli("export", run_dir, "--model", sd2_model, "-f", "unet", "-o", out)
    assert result.exit_code == 1
    assert "does not fit" in result.stderr and "shape mismatch" in result.stderr
    assert not out.exists()


def test_tokens_from_an_esd_run_are_refused(run_cli, tmp_path, erased_state):
    esd = _write_run(tmp_path / "esd", erased_state, method="esd", tokens=None)
    result = run_cli("export", esd, "-f", "tokens", "-o", tmp_path / "tokens")
    assert result.exit_code == 1 and "no learned tokens" in result.stderr and "esd" in result.stderr


def test_output_name_must_fit_the_format(run_cli, run_dir, tmp_path):
    result = run_cli("export", run_dir, "-f", "single-file", "-o", tmp_path / "model.ckpt")
    assert result.exit_code == 2 and ".safetensors" in result.stderr
    result = run_cli("export", run_dir, "-f", "diffusers", "-o", tmp_path / "model.safetensors")
    assert result.exit_code == 2


def test_a_failed_check_leaves_nothing_behind(run_cli, run_dir, tmp_path, monkeypatch):
    from recare_cli import export as core

    monkeypatch.setitem(core.TOLERANCE, "fp32", -1.0)  # no difference passes: the check must refuse
    out_dir = tmp_path / "exports"
    out_dir.mkdir()
    result = run_cli("export", run_dir, "-f", "diffusers", "-o", out_dir / "pipeline")
    assert result.exit_code == 1 and "export check failed" in result.stderr
    assert list(out_dir.iterdir()) == []
