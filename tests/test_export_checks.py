"""Export's reload check can fail: a weight perturbed while a writer writes it fails the command, and nothing is left.

The fault goes in at the one place every writer's bytes pass through, `safetensors.torch.save_file`
(diffusers' save_pretrained included; transformers binds it as `safe_save_file`), so the check sees exactly what a corrupted write would give.
"""

from __future__ import annotations

import json

import pytest
import torch

from test_export import _json_result, erased_state, run_dir  # noqa: F401 - fixtures

# The tensor each writer's file holds for the UNet's output bias (it adds straight to the probe),
# for a text-encoder weight (the probe never sees it: only the bit-for-bit check can), and the LoRA / token tensors.
UNET_OUTPUT_BIAS = ("conv_out.bias", "model.diffusion_model.out.2.bias")
TEXT_WEIGHT = ("final_layer_norm.weight",)
LORA_OUTPUT = ("unet.conv_out.lora_B.weight",)
TOKEN = ("token_",)
OUTPUTS = {"unet": "unet.safetensors", "single-file": "model.safetensors", "diffusers": "pipe",
           "lora": "lora.safetensors", "tokens": "tokens"}
WRITER_MODULES = {"unet": "unet", "single-file": "single_file", "diffusers": "diffusers_folder"}


def _inject(monkeypatch, suffixes: tuple[str, ...]) -> list[str]:
    """Make save_file add 1 to every tensor whose key ends with (or, for tokens, starts with) one of `suffixes`."""
    import safetensors.torch
    import transformers.modeling_utils

    real = safetensors.torch.save_file
    hits = []

    def faulty(tensors, filename, metadata=None):
        tensors = dict(tensors)
        for key in tensors:
            if key.endswith(suffixes) or key.startswith(suffixes):
                tensors[key] = (tensors[key].float() + 1.0).to(tensors[key].dtype)
                hits.append(key)
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", faulty)
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", faulty)  # the text encoder's writer
    return hits


def _export(run_cli, run_dir, fmt: str, dtype: str, out):  # noqa: F811
    return run_cli("export", run_dir, "-f", fmt, "-o", out / OUTPUTS[fmt], "--dtype", dtype, "--device", "cpu", "--json")


def _failed_and_wrote_nothing(result, folder) -> None:
    assert result.exit_code == 1, result.stderr
    assert "export check failed" in result.stderr and "nothing was written" in result.stderr
    assert list(folder.iterdir()) == []  # neither the output nor a staging folder


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("fmt,suffixes", [("unet", UNET_OUTPUT_BIAS), ("single-file", UNET_OUTPUT_BIAS),
                                          ("diffusers", UNET_OUTPUT_BIAS), ("lora", LORA_OUTPUT),
                                          ("tokens", TOKEN)])
def test_a_perturbed_weight_fails_the_export(run_cli, run_dir, tmp_path, monkeypatch, fmt, suffixes, dtype):  # noqa: F811
    hits = _inject(monkeypatch, suffixes)
    result = _export(run_cli, run_dir, fmt, dtype, tmp_path)
    assert hits, "the fault went in"
    _failed_and_wrote_nothing(result, tmp_path)


@pytest.mark.parametrize("fmt", ["unet", "single-file", "diffusers"])
def test_the_probe_alone_catches_a_perturbed_unet(run_cli, run_dir, tmp_path, monkeypatch, fmt):  # noqa: F811
    import importlib

    # Each writer calls the bit-for-bit check by its own module's name: switch it off there.
    writer = importlib.import_module(f"recare_cli.export.{WRITER_MODULES[fmt]}")
    skipped = []
    monkeypatch.setattr(writer, "require_same_weights", lambda *args, **kwargs: skipped.append(args))
    _inject(monkeypatch, UNET_OUTPUT_BIAS)
    _failed_and_wrote_nothing(_export(run_cli, run_dir, fmt, "bf16", tmp_path), tmp_path)
    assert skipped, "the weight check the writer calls was switched off"


@pytest.mark.parametrize("fmt", ["single-file", "diffusers"])
def test_the_weight_check_catches_what_the_probe_cannot_see(run_cli, run_dir, tmp_path, monkeypatch, fmt):  # noqa: F811
    hits = _inject(monkeypatch, TEXT_WEIGHT)
    result = _export(run_cli, run_dir, fmt, "fp32", tmp_path)
    assert hits
    _failed_and_wrote_nothing(result, tmp_path)
    assert "text_encoder" in result.stderr


@pytest.mark.parametrize("fmt", list(OUTPUTS))
def test_bf16_export_of_every_format_passes_its_check(run_cli, run_dir, tmp_path, fmt):  # noqa: F811
    data = _json_result(_export(run_cli, run_dir, fmt, "bf16", tmp_path))
    assert data["dtype"] == "bf16" and 0 <= data["max_abs_diff"] <= data["tolerance"]
    written = tmp_path / OUTPUTS[fmt]
    files = [written] if written.is_file() else sorted(written.rglob("*.safetensors"))
    from safetensors import safe_open

    dtypes = set()
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            dtypes |= {handle.get_slice(k).get_dtype() for k in handle.keys()}
    assert dtypes == {"BF16"}, json.dumps(sorted(dtypes))


def test_the_weight_check_names_what_is_missing_unexpected_or_changed():
    from recare_cli.errors import RecareError
    from recare_cli.export.check import require_same_weights

    written = {"a.weight": torch.zeros(2, 3), "b.weight": torch.ones(4), "c.bias": torch.zeros(3)}
    require_same_weights(written, {k: v.clone() for k, v in written.items()}, "UNet")  # the same: no error

    def failure(loaded: dict) -> str:
        with pytest.raises(RecareError) as caught:
            require_same_weights(written, loaded, "UNet")
        assert "--verbose" in caught.value.hint  # what to do next, on the error's own line
        return caught.value.message

    missing = failure({k: v for k, v in written.items() if k != "b.weight"})
    assert "1 missing, 0 unexpected, 0 changed, e.g. b.weight" in missing and "the UNet did not load back" in missing
    unexpected = failure({**written, "d.weight": torch.zeros(1)})
    assert "0 missing, 1 unexpected, 0 changed, e.g. d.weight" in unexpected
    reshaped = failure({**written, "a.weight": torch.zeros(3, 2)})  # same values, another shape
    assert "0 missing, 0 unexpected, 1 changed, e.g. a.weight" in reshaped
    nudged = failure({**written, "c.bias": torch.tensor([0.0, 0.0, 1e-7])})  # any difference at all
    assert "1 changed, e.g. c.bias" in nudged
    everything = failure({"a.weight": torch.ones(2, 3), "d.weight": torch.zeros(1), "e.weight": torch.zeros(1)})
    assert "2 missing, 2 unexpected, 1 changed, e.g. b.weight, c.bias, d.weight);" in everything  # three, no more


@pytest.mark.parametrize("pipe_fixture", ["tiny_pipe", "tiny_xl_pipe"])
def test_the_probe_is_a_fixed_fp32_prediction_that_sees_every_unet_input(request, pipe_fixture):
    """The probe is what exports are compared by: the same UNet gives the same probe in any dtype
    (up to rounding), a changed weight changes it, and SDXL's pooled embedding and time ids reach it."""
    import copy

    from recare_cli.export.check import PROBE_MAX_SIZE, unet_probe

    unet = copy.deepcopy(request.getfixturevalue(pipe_fixture).unet)
    probe = unet_probe(unet)
    side = min(unet.config.sample_size, PROBE_MAX_SIZE)
    assert probe.dtype == torch.float32 and probe.shape == (1, unet.config.out_channels, side, side)
    assert torch.equal(unet_probe(unet), probe)  # fixed inputs: the same UNet, the same probe
    assert (unet_probe(copy.deepcopy(unet).to(torch.bfloat16)) - probe).abs().max() < 0.25  # upcast, then compared
    with torch.no_grad():
        unet.conv_out.bias += 1e-3
    assert not torch.equal(unet_probe(unet), probe)
    if unet.config.addition_embed_type == "text_time":  # SDXL: the added conditioning is part of the probe
        seen = {}
        unet.register_forward_pre_hook(lambda m, a, k: seen.update(k["added_cond_kwargs"]), with_kwargs=True)
        unet_probe(unet)
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        assert seen["text_embeds"].shape == (1, pooled)
        assert seen["time_ids"].tolist() == [[8.0 * side, 8.0 * side, 0.0, 0.0, 8.0 * side, 8.0 * side]]


def test_export_loads_back_each_component_in_the_written_dtype(tiny_pipe, tiny_xl_pipe):
    from recare_cli.export.check import _components, _load_kwargs

    assert _components(tiny_pipe) == ("vae", "text_encoder", "unet")
    assert _components(tiny_xl_pipe) == ("vae", "text_encoder", "text_encoder_2", "unet")
    for name, dtype in (("fp32", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16)):
        assert _load_kwargs(name, tiny_pipe) == {"torch_dtype": dtype, "local_files_only": True,
                                                 "safety_checker": None, "requires_safety_checker": False}
    # an SD pipeline exported with its safety checker loads it back; SDXL has none to switch off
    assert _load_kwargs("fp16", tiny_pipe, safety_checker=True) == {"torch_dtype": torch.float16, "local_files_only": True}
    assert _load_kwargs("bf16", tiny_xl_pipe) == {"torch_dtype": torch.bfloat16, "local_files_only": True}
