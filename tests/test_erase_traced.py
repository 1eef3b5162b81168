"""The erase loops' traced UNet calls on a CPU (recare_cli/erase/traced.py): the module's results, bit for bit."""

from __future__ import annotations

import copy

import pytest
import torch

from test_erase_cli import inputs, load, same_tensors, tiny_args  # noqa: F401 -- `inputs` is a fixture


def module_eps(models, latents, t, embeds, weights=None):
    """The UNet's prediction through the module itself, as `EraseModels.eps` computes it untraced."""
    traces, models.traces = models.traces, None
    try:
        return models.eps(latents, t, embeds, weights)
    finally:
        models.traces = traces


@pytest.fixture(autouse=True)
def trace_at_once(monkeypatch):
    """Every signature traced on its first call (runs trace theirs after TRACE_AFTER calls)."""
    import recare_cli.erase.traced as traced

    monkeypatch.setattr(traced, "TRACE_AFTER", 1)


def taken(models) -> int:
    """How many traces were taken (a failed one is kept as None, and its calls run the module)."""
    return sum(trace is not None for trace in models.traces._traces.values())


@pytest.fixture
def models(tiny_pipe):
    from recare_cli.erase.context import EraseModels

    return EraseModels.from_pipeline(copy.deepcopy(tiny_pipe), "cpu")


def test_traces_are_for_cpu_runs_unless_turned_off(monkeypatch):
    from recare_cli.erase.traced import UNetTraces

    monkeypatch.delenv("RECARE_TRACE_UNET", raising=False)
    assert UNetTraces.wanted("cpu") and not UNetTraces.wanted("cuda:0") and not UNetTraces.wanted("mps")
    monkeypatch.setenv("RECARE_TRACE_UNET", "0")
    assert not UNetTraces.wanted("cpu")


def test_traced_predictions_and_gradients_are_the_modules_bit_for_bit(models):
    from recare_cli.erase.params import select_trainable

    assert models.traces is not None
    embeds = models.embed(["a cat", "a dog"])
    for latents in (torch.randn(2, 4, 8, 8), torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8).expand(2, -1, -1, -1)):
        with torch.no_grad():
            assert torch.equal(models.eps(latents, 500, embeds[: len(latents)]),
                               module_eps(models, latents, 500, embeds[: len(latents)]))

    # An inversion step's gradient to the text, and a training step's to the trained weights, several
    # times: TorchScript's executor optimizes a graph after its first runs (and moves results by ~1e-9).
    trainable = select_trainable(models.unet, "noxattn")
    models.unet.train()
    for _ in range(4):
        latents, timesteps = torch.randn(1, 4, 8, 8), torch.randint(0, 999, (1,))
        grads = []
        for predict in (models.eps, lambda *a: module_eps(models, *a)):
            text = embeds[:1].clone().requires_grad_(True)
            for p in trainable.values():
                p.grad = None
            predict(latents, timesteps, text).square().mean().backward()
            grads.append([text.grad, *(p.grad for p in trainable.values())])
        assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))
    assert taken(models) == len(models.traces._traces) == 3  # batch 2 and 1 in eval mode, batch 1 in train mode


def test_train_mode_gets_its_own_trace(models):
    """Dropout is fixed in a trace as it was taken: on in train mode, off in eval mode."""
    for module in models.unet.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.5
    latents, embeds = torch.randn(1, 4, 8, 8), models.embed(["a cat"])
    with torch.no_grad():
        models.eps(latents, 500, embeds)  # traced in eval mode
        models.unet.train()
        outputs = []
        for predict in (models.eps, lambda *a: module_eps(models, *a)):
            torch.manual_seed(0)
            outputs.append(predict(latents, 500, embeds))
    assert torch.equal(*outputs) and taken(models) == 2


def test_a_trace_follows_in_place_weight_updates(models):
    latents, embeds = torch.randn(1, 4, 8, 8), models.embed(["a cat"])
    with torch.no_grad():
        before = models.eps(latents, 500, embeds)
        for p in models.unet.parameters():
            p.mul_(1.01)  # as an optimizer step or load_into changes them: in place
        after = models.eps(latents, 500, embeds)
    assert taken(models) == 1 and not torch.equal(before, after) and torch.equal(after, module_eps(models, latents, 500, embeds))


def test_a_frozen_snapshot_runs_through_the_same_trace_as_the_current_weights(models):
    from recare_cli.erase.context import snapshot
    from recare_cli.erase.params import select_trainable

    trainable = select_trainable(models.unet, "xattn")
    frozen = snapshot(trainable)
    with torch.no_grad():
        for p in trainable.values():
            p.add_(0.05)
    latents, embeds = torch.randn(2, 4, 8, 8), models.embed(["a cat", "a dog"])
    with torch.no_grad():
        current, before = models.eps(latents, 500, embeds), models.eps(latents, 500, embeds, weights=frozen)
        assert not torch.equal(current, before) and taken(models) == 1
        assert torch.equal(before, module_eps(models, latents, 500, embeds, frozen))
        assert torch.equal(current, module_eps(models, latents, 500, embeds))


def test_a_unet_sharing_a_parameter_between_modules_is_not_traced(models):
    """A shared parameter would be replaced in one of its modules only: the module runs instead."""
    first, second = [m for m in models.unet.modules() if isinstance(m, torch.nn.GroupNorm) and m.num_channels == 32][:2]
    second.weight = first.weight
    name = next(n for n, p in models.unet.named_parameters() if p is first.weight)
    from recare_cli.erase.context import EraseModels

    models = EraseModels.from_pipeline(models.pipe, "cpu")  # its traces see the shared parameter
    latents, embeds, doubled = torch.randn(1, 4, 8, 8), models.embed(["a cat"]), {name: first.weight.detach() * 2}
    with torch.no_grad():
        assert torch.equal(models.eps(latents, 500, embeds, doubled), module_eps(models, latents, 500, embeds, doubled))
    assert models.traces._traces == {}


def test_a_latent_size_the_upsamplers_cannot_double_gets_its_own_trace(models):
    """The UNet passes odd sizes to its upsamplers only where the input needs it: a branch on shape."""
    embeds = models.embed(["a cat"])
    with torch.no_grad():
        for side in (8, 9):
            latents = torch.randn(1, 4, side, side)
            assert torch.equal(models.eps(latents, 500, embeds), module_eps(models, latents, 500, embeds))
    assert taken(models) == 2


def test_a_signature_runs_as_a_module_until_it_has_run_trace_after_times(models, monkeypatch):
    import recare_cli.erase.traced as traced

    monkeypatch.setattr(traced, "TRACE_AFTER", 3)
    latents, embeds = torch.randn(1, 4, 8, 8), models.embed(["a cat"])
    traced_after = []
    with torch.no_grad():
        for _ in range(4):
            models.eps(latents, 500, embeds)
            traced_after.append(taken(models))
        models.eps(latents.expand(2, -1, -1, -1), 500, embeds.expand(2, -1, -1))  # another signature starts at one
    assert traced_after == [0, 0, 1, 1] and len(models.traces._traces) == 1 and models.counter.images == 6


def test_traced_calls_bypass_the_module_count_once_each_and_taking_a_trace_counts_nothing(models):
    module_calls = []
    models.unet.register_forward_pre_hook(lambda module, args: module_calls.append(len(args[0])))
    with torch.no_grad():
        models.eps(torch.randn(2, 4, 8, 8), 500, models.embed(["a", "b"]))
        models.eps(torch.randn(2, 4, 8, 8), 400, models.embed(["a", "b"]))
    assert module_calls == [2]  # the one run that took the trace; both calls then ran the trace
    assert models.counter.images == 4 and taken(models) == 1


def test_gradient_checkpointing_and_autocast_leave_the_call_to_the_module(models):
    latents, embeds = torch.randn(1, 4, 8, 8), models.embed(["a cat"])
    models.unet.enable_gradient_checkpointing()
    models.eps(latents, 500, embeds)
    models.unet.disable_gradient_checkpointing()
    models.autocast_dtype = torch.bfloat16
    models.eps(latents, 500, embeds)
    assert models.traces._traces == {}


def test_a_unet_that_cannot_be_traced_runs_as_a_module(models, monkeypatch):
    def refuse(*args, **kwargs):
        raise RuntimeError("not traceable")

    monkeypatch.setattr(torch.jit, "trace", refuse)
    latents, embeds = torch.randn(1, 4, 8, 8), models.embed(["a cat"])
    with torch.no_grad():
        assert torch.equal(models.eps(latents, 500, embeds), module_eps(models, latents, 500, embeds))
    assert list(models.traces._traces.values()) == [None] and models.counter.images == 2


def test_sdxl_traced_predictions_carry_the_pooled_embedding_and_time_ids(tiny_xl_pipe):
    from recare_cli.erase.context import EraseModels

    models = EraseModels.from_pipeline(copy.deepcopy(tiny_xl_pipe), "cpu")
    latents, embeds = torch.randn(2, 4, 8, 8), models.embed(["a cat", "a dog"])
    other = embeds.clone()
    other[:, -1] += 1  # only the pooled row differs
    with torch.no_grad():
        assert torch.equal(models.eps(latents, 500, embeds), module_eps(models, latents, 500, embeds))
        assert torch.equal(models.eps(latents, 500, other), module_eps(models, latents, 500, other))
        assert not torch.equal(models.eps(latents, 500, other), models.eps(latents, 500, embeds))
    assert taken(models) == 1


def test_an_erase_run_trains_the_same_weights_and_tokens_traced_or_not(run_cli, inputs, tmp_path, monkeypatch):  # noqa: F811
    from recare_cli.erase.traced import UNetTraces

    take, taken_in_run = UNetTraces._trace, []
    monkeypatch.setattr(UNetTraces, "_trace", lambda self, *a, **k: taken_in_run.append(take(self, *a, **k)) or taken_in_run[-1])
    outs = {"0": tmp_path / "module", "1": tmp_path / "traced"}
    for setting, out in outs.items():
        monkeypatch.setenv("RECARE_TRACE_UNET", setting)
        result = run_cli(*tiny_args(inputs, out, "--quiet"))
        assert result.exit_code == 0, result.stderr
    assert len(taken_in_run) >= 4 and None not in taken_in_run  # prefix, trained, frozen and inversion calls
    for name in ("unet.safetensors", "tokens.safetensors"):
        assert same_tensors(load(outs["0"] / name), load(outs["1"] / name))
