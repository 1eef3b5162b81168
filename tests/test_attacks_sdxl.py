"""`recare eval --attack` on SDXL (`tiny-random-xl`): both text encoders, pooled embeds and time ids."""

from __future__ import annotations

import copy
import csv
import json

import pytest
import torch
from safetensors import safe_open

from recare_cli.attacks import AttackContext, AttackSettings, AttackTarget, ConceptSource
from recare_cli.attacks import unlearndiffatk
from noise_images import noise_images
from tests.test_attacks import one_hot, seen_metric  # noqa: F401 - a fixture

XL = ["--model", "tiny-random-xl", "--device", "cpu"]
FAST = ["--steps", "2", "--height", "64", "--width", "64"]


@pytest.fixture
def xl_models(tiny_xl_pipe):
    from recare_cli.erase.context import EraseModels

    return EraseModels.from_pipeline(copy.deepcopy(tiny_xl_pipe), "cpu")


def context(models, work, attack="unlearndiffatk", concept=None, **settings) -> AttackContext:
    return AttackContext(attack, "model", "tiny-random-xl", models, AttackSettings(**settings), work,
                         concept=concept, resolution=64)


@pytest.mark.parametrize("pools_at_highest_id", [False, True])
def test_the_prefix_conditions_the_unet_as_its_tokens_would(xl_models, tmp_path, pools_at_highest_id):
    """The search's conditioning for a chosen prefix is the model's own conditioning of those tokens:
    both encoders' states, and the pooled embedding, also for an encoder configured as SDXL's
    OpenCLIP-bigG is (eos_token_id 2: it pools at the highest id)."""
    if pools_at_highest_id:
        xl_models.text_encoder_2.text_model.eos_token_id = 2
    ctx = context(xl_models, tmp_path)
    vocabulary = ctx.vocabulary()
    ids = xl_models.tokenizer("cat dog", add_special_tokens=False).input_ids
    prompt = unlearndiffatk.PrefixPrompt(xl_models, "a red apple", 2, vocabulary)
    with torch.no_grad():
        searched = prompt(one_hot(vocabulary, ids))
    as_text = xl_models.embed(["cat dog a red apple"])
    assert searched.shape == as_text.shape and torch.allclose(searched, as_text, atol=1e-5)


def test_unlearndiffatk_predicts_with_pooled_embeds_and_time_ids_and_keeps_ids_valid_in_both_tokenizers(
        xl_models, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(xl_models, "traces", None)  # a traced call would run no hook
    xl_models.unet.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(kwargs.get("added_cond_kwargs")), with_kwargs=True)
    target_image = noise_images(tmp_path / "target", 1, 64) / "noise_0.png"
    ctx = context(xl_models, tmp_path, steps=3, tokens=3)
    found = unlearndiffatk.run(ctx, AttackTarget("a red apple", 42, "a_red_apple_0.png", target_image=target_image))

    assert len(calls) == 3 and len(found.losses) == 3
    for added in calls:
        assert added["text_embeds"].shape == (1, 48) and added["time_ids"].tolist() == [[64, 64, 0, 0, 64, 64]]
    assert len(found.token_ids) == 3
    for encoder, tokenizer in xl_models.text_encoders:
        assert all(0 <= i < tokenizer.vocab_size and i not in tokenizer.all_special_ids for i in found.token_ids)
        assert all(i < encoder.get_input_embeddings().weight.shape[0] for i in found.token_ids)
    assert 0 not in ctx.vocabulary().tolist()  # "!": plain text in CLIP-L's tokenizer, padding in the second's
    assert found.prompt == f"{xl_models.tokenizer.decode(found.token_ids).strip()} a red apple"


def test_concept_inversion_learns_in_both_encoders_and_leaves_the_attacked_model_unchanged(xl_models, tmp_path):
    from recare_cli.attacks import concept_inversion
    from recare_cli.builtins.concept_types import OBJECT_TEMPLATES

    unet_before = {k: v.clone() for k, v in xl_models.unet.state_dict().items()}
    tables = [encoder.get_input_embeddings().weight for encoder, _ in xl_models.text_encoders]
    tables_before = [table.detach().clone() for table in tables]
    images = noise_images(tmp_path / "apples", 2)
    concept = ConceptSource(("apple",), tuple(sorted(images.iterdir())), OBJECT_TEMPLATES, "object")
    found = concept_inversion.run(context(xl_models, tmp_path / "work", "concept-inversion", concept, steps=2),
                                  AttackTarget("a red apple", 42, "x_0.png"))

    (token, embedding), = found.embeddings.items()
    assert found.prompt == f"a red {token}" and embedding.shape == (32 + 48,)
    assert all(torch.equal(v, unet_before[k]) for k, v in xl_models.unet.state_dict().items())
    for (encoder, tokenizer), before, row in zip(xl_models.text_encoders, tables_before, embedding.split([32, 48])):
        after = encoder.get_input_embeddings().weight.detach()
        assert torch.equal(after[: len(before)], before)
        assert torch.equal(after[tokenizer.convert_tokens_to_ids(token)], row)


def read_csv(path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("attack, extra", [
    ("unlearndiffatk", ["--attack-tokens", "2"]),
    ("concept-inversion", ["--target", "apple", "--attack-images", "IMAGES"]),
])
def test_each_attack_runs_on_sdxl_through_eval(run_cli, tmp_path, seen_metric, attack, extra):
    images = noise_images(tmp_path / "apples", 2)
    out = tmp_path / "out"
    extra = [str(images) if a == "IMAGES" else a for a in extra]
    result = run_cli("eval", *XL, "-m", seen_metric, "-p", "a photo of an apple", *FAST, "--attack", attack,
                     "--attack-steps", "2", *extra, "--output-dir", out, "--json")
    assert result.exit_code == 0, result.stderr
    folder = out / "attacks" / f"model+{attack}"
    (row,) = read_csv(folder / "prompts.csv")
    assert row["source_prompt"] == "a photo of an apple" and row["prompt"] != row["source_prompt"]
    manifest = [json.loads(line) for line in (out / "images" / f"model+{attack}" / "manifest.jsonl").open()]
    assert [(m["prompt"], m["attack"]) for m in manifest] == [(row["prompt"], attack)]
    assert (out / "images" / f"model+{attack}" / manifest[0]["file"]).is_file()
    if attack == "concept-inversion":
        with safe_open(str(folder / "embeddings.safetensors"), framework="pt") as handle:
            shapes = {k: tuple(handle.get_tensor(k).shape) for k in handle.keys()}
            (token,) = json.loads(handle.metadata()["tokens"])
        assert shapes == {"clip_l": (1, 32), "clip_g": (1, 48)} and token in row["prompt"]
