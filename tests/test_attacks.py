"""`recare eval --attack`: the two built-in attacks, their results files, resume, and bad input."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from recare_cli.attacks import AttackContext, AttackSettings, AttackTarget, ConceptSource
from recare_cli.attacks import unlearndiffatk
from recare_cli.evaluate import EvalContext, Row
from recare_cli.generate import read_prompts
from recare_cli.output import Task
from recare_cli.plugins import Metric, registry
from noise_images import noise_images

TINY = ["--model", "tiny-random", "--device", "cpu"]
FAST = ["--steps", "2", "--height", "64", "--width", "64"]


@pytest.fixture
def run_dir(tmp_path, tiny_pipe) -> Path:
    """An erase run directory as `recare erase` leaves it: weights, manifest and training images of `apple`."""
    from safetensors.torch import save_file

    folder = tmp_path / "run"
    noise_images(folder / "images" / "apple", 3)
    save_file({k: v.contiguous() for k, v in tiny_pipe.unet.state_dict().items()}, str(folder / "unet.safetensors"))
    (folder / "recare-run.json").write_text(json.dumps({"concepts": ["apple"], "type": "object", "parameters": {}}))
    return folder


@pytest.fixture
def seen_metric():
    """A metric that reports the prompt and seed of every image it is given, registered like a plugin's."""
    def seen(ctx: EvalContext) -> list[Row]:
        images = ctx.images()
        rows = [Row({"image": i.file}, {"prompt_seen": i.prompt, "seed_seen": i.seed}, detail=True) for i in images]
        prompts = sorted({i.prompt for i in images})
        return rows + [Row({"prompt": p}, {"images": sum(i.prompt == p for i in images)}) for p in prompts]

    registry().metrics["seen"] = Metric("seen", seen)
    yield "seen"
    registry().metrics.pop("seen", None)


def json_lines(result) -> list[dict]:
    return [json.loads(line) for line in result.stdout.splitlines()]


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


# unlearndiffatk ------------------------------------------------------------------------------

def bisection_projection(row: torch.Tensor, xi: float = 1e-7) -> torch.Tensor:
    """The reference's projection (Diffusion-MU-Attack text_grad_.py `bisection`, eps = 1, ub = 1)."""
    if abs(float(row.clamp(0, 1).sum()) - 1) <= xi:
        return row.clamp(0, 1)
    low, high = float(row.min()) - 1, float(row.max())
    while high - low > xi:
        mid = (low + high) / 2
        if float((row - mid).clamp(0, 1).sum()) > 1:
            low = mid
        else:
            high = mid
    return (row - (low + high) / 2).clamp(0, 1)


def one_hot(vocabulary: torch.Tensor, ids: list[int]) -> torch.Tensor:
    """Prefix weights choosing `ids`: one row per position over `vocabulary`."""
    return (vocabulary.unsqueeze(0) == torch.tensor(ids).unsqueeze(1)).float()


def test_projection_is_the_published_simplex_projection():
    generator = torch.Generator().manual_seed(0)
    weights = torch.cat([torch.randn(4, 50, generator=generator, dtype=torch.float64),
                         torch.full((1, 50), 1 / 50, dtype=torch.float64) + 0.01 * torch.arange(50)])
    projected = unlearndiffatk.project_to_simplex(weights)
    assert (projected >= 0).all()
    assert torch.allclose(projected.sum(dim=1), torch.ones(5, dtype=torch.float64))
    for row, mine in zip(weights, projected):
        assert torch.allclose(mine, bisection_projection(row), atol=1e-6)
    assert torch.allclose(unlearndiffatk.project_to_simplex(projected), projected)


@pytest.fixture(scope="module")
def tiny_models():
    from recare_cli.erase.context import EraseModels
    from recare_cli.models import Runtime

    return EraseModels.load(Runtime("tiny-random", device="cpu"))


def attack_context(models, tmp_path, attack="unlearndiffatk", concept=None, **settings) -> AttackContext:
    return AttackContext(attack, "model", "tiny-random", models, AttackSettings(**settings), tmp_path,
                         concept=concept, resolution=64)


def test_the_prefix_is_made_of_real_vocabulary_tokens(tiny_models, tmp_path):
    from recare_cli.erase.inversion import add_token

    models = tiny_models
    target_image = noise_images(tmp_path / "target", 1, 64) / "noise_0.png"
    added = add_token(models, "token_learned1", torch.zeros(models.text_encoder.config.hidden_size))
    ctx = attack_context(models, tmp_path, steps=3, tokens=4)
    vocabulary = ctx.vocabulary().tolist()
    assert added not in vocabulary and not set(models.tokenizer.all_special_ids) & set(vocabulary)
    assert len(vocabulary) == models.tokenizer.vocab_size - len(models.tokenizer.all_special_ids)

    found = unlearndiffatk.run(ctx, AttackTarget("a red apple", 42, "a_red_apple_0.png", target_image=target_image))
    assert len(found.token_ids) == 4 and set(found.token_ids) <= set(vocabulary)
    assert found.prompt == f"{models.tokenizer.decode(found.token_ids).strip()} a red apple"
    assert len(found.losses) == 3

    # The search answers in token ids of the vocabulary it is given, not in positions within it.
    some_words = torch.arange(1000, 1100)
    prompt = unlearndiffatk.PrefixPrompt(models, "a red apple", 2, some_words)
    latents = unlearndiffatk.target_latents(models, target_image)
    ids, _ = unlearndiffatk.search(models, prompt, latents, 2, 0.01, 0, Task())
    assert all(1000 <= i < 1100 for i in ids)


def test_unlearndiffatk_loss_falls_on_the_toy_model(tmp_path):
    """Aimed at a star, the prefix found for "a circle" makes the toy model denoise the star better."""
    from recare_cli.erase.context import EraseModels
    from recare_cli.models import Runtime

    models = EraseModels.load(Runtime("toy", device="cpu"))
    star = models.pipe("a star", num_inference_steps=10, generator=torch.Generator().manual_seed(0)).images[0]
    star.save(tmp_path / "star.png")
    ctx = AttackContext("unlearndiffatk", "model", "toy", models, AttackSettings(), tmp_path)
    found = unlearndiffatk.run(ctx, AttackTarget("a circle", 0, "a_circle_0.png", target_image=tmp_path / "star.png"))
    assert len(found.losses) == unlearndiffatk.DEFAULT_STEPS and len(found.token_ids) == unlearndiffatk.DEFAULT_TOKENS

    # Judged on noise and timesteps the search never drew: the found prefix against the one it started from.
    prompt = unlearndiffatk.PrefixPrompt(models, "a circle", unlearndiffatk.DEFAULT_TOKENS, ctx.vocabulary())
    latents = unlearndiffatk.target_latents(models, tmp_path / "star.png")
    generator = torch.Generator().manual_seed(12345)
    bank = [(t, torch.randn(latents.shape, generator=generator)) for t in unlearndiffatk.TIMESTEPS[::6]]

    @torch.no_grad()
    def held_out_loss(ids: list[int]) -> float:
        embeds = prompt(one_hot(prompt.vocabulary, ids))
        return sum(float(unlearndiffatk.denoising_loss(models, embeds, latents, t, n)) for t, n in bank) / len(bank)

    start = [int(ctx.vocabulary()[0])] * unlearndiffatk.DEFAULT_TOKENS  # the argmax of the uniform start
    assert held_out_loss(found.token_ids) < 0.9 * held_out_loss(start)


# concept-inversion -------------------------------------------------------------------------

def test_concept_inversion_leaves_the_attacked_model_unchanged(tiny_models, tmp_path):
    from recare_cli.attacks import concept_inversion
    from recare_cli.builtins.concept_types import OBJECT_TEMPLATES

    models = tiny_models
    unet_before = {k: v.clone() for k, v in models.unet.state_dict().items()}
    rows_before = models.text_encoder.get_input_embeddings().weight.detach().clone()
    images = noise_images(tmp_path / "apples", 2)
    concept = ConceptSource(("apple",), tuple(sorted(images.iterdir())), OBJECT_TEMPLATES, "object")
    ctx = attack_context(models, tmp_path / "work", "concept-inversion", concept, steps=3)

    found = concept_inversion.run(ctx, AttackTarget("a red Apple on a table", 42, "x_0.png"))
    (token, embedding), = found.embeddings.items()
    assert found.prompt == f"a red {token} on a table"
    assert concept_inversion.run(ctx, AttackTarget("a bowl", 42, "y_0.png")).prompt == f"{token} a bowl"

    assert all(torch.equal(v, unet_before[k]) for k, v in models.unet.state_dict().items())
    rows_after = models.text_encoder.get_input_embeddings().weight.detach()
    assert torch.equal(rows_after[: len(rows_before)], rows_before)
    initial = rows_before[models.tokenizer.convert_tokens_to_ids("object</w>")]
    assert not torch.equal(embedding, initial), "the token learned nothing"
    assert torch.equal(rows_after[models.tokenizer.convert_tokens_to_ids(token)], embedding)


# the command -------------------------------------------------------------------------------

def test_unlearndiffatk_attacks_both_models_and_resumes(tmp_path, run_dir, run_cli, seen_metric, monkeypatch):
    from PIL import Image

    from recare_cli import pictures

    real_grid, grid_rows = pictures.eval_grid, []

    def spy_grid(models, records, path, **kwargs):
        models = list(models)
        grid_rows.append([label for label, _ in models])
        return real_grid(models, records, path, **kwargs)

    monkeypatch.setattr(pictures, "eval_grid", spy_grid)
    out = tmp_path / "out"
    args = ["eval", *TINY, "-m", seen_metric, "--unet", run_dir, "--compare", "base", "-p", "a red apple",
            "--num-images", "2", *FAST, "--attack", "unlearndiffatk", "--attack-steps", "2", "--attack-tokens", "2",
            "--output-dir", out, "--json"]
    result = run_cli(*args)
    assert result.exit_code == 0, result.stderr
    lines = json_lines(result)
    attacked = [line for line in lines if line.get("event") == "attacked"]
    assert sorted((a["model"], a["seed"]) for a in attacked) == [("base", 42), ("base", 43), ("erased", 42), ("erased", 43)]
    # grid.png: base above erased, then a row for each attacked model.
    assert grid_rows[0][:2] == ["base", "erased"]
    assert sorted(grid_rows[0][2:]) == ["base+unlearndiffatk", "erased+unlearndiffatk"]
    with Image.open(out / "grid.png") as grid:
        assert grid.format == "PNG" and grid.height > grid.width / 4

    for label in ("erased", "base"):
        folder = out / "attacks" / f"{label}+unlearndiffatk"
        rows = read_csv(folder / "prompts.csv")
        assert {a["adversarial"] for a in attacked if a["model"] == label} == {r["prompt"] for r in rows}
        assert [(r["source_prompt"], r["seed"]) for r in rows] == [("a red apple", "42"), ("a red apple", "43")]
        assert all(r["prompt"].endswith(" a red apple") and len(r["prompt"]) > len("a red apple") for r in rows)
        # `recare generate --prompts-file` reads the same prompts, seeds and image names back.
        again = read_prompts(prompts_file=folder / "prompts.csv")
        assert [(p.prompt, p.seed, p.case_number) for p in again] == [
            (r["prompt"], int(r["seed"]), r["case_number"]) for r in rows]
        manifest = [json.loads(line) for line in (out / "images" / f"{label}+unlearndiffatk" / "manifest.jsonl").open()]
        assert {(m["prompt"], m["seed"], m["source_file"], m["attack"]) for m in manifest} == {
            (r["prompt"], int(r["seed"]), r["source_file"], "unlearndiffatk") for r in rows}

    # The attacked images are judged as the prompts they attack, with their seeds.
    results = read_csv(out / "results.csv")
    per_image = [r for r in results if r["model"] == "erased+unlearndiffatk" and r["detail"] == "1"]
    assert sorted((r["prompt_seen"], r["seed_seen"]) for r in per_image) == [("a red apple", "42"), ("a red apple", "43")]
    summary = {r["model"]: r for r in results if r["detail"] == "0"}
    assert set(summary) == {"erased", "base", "delta", "erased+unlearndiffatk", "base+unlearndiffatk",
                            "delta erased+unlearndiffatk", "delta base+unlearndiffatk"}
    assert summary["delta erased+unlearndiffatk"]["images"] == "0"
    assert str(out / "attacks" / "erased+unlearndiffatk" / "prompts.csv") in lines[-1]["files"]

    # A rerun attacks nothing again and keeps every image.
    image = next((out / "images" / "erased+unlearndiffatk").glob("*.png"))
    mtime = image.stat().st_mtime_ns
    human = run_cli(*args[:-1], "--overwrite")
    assert human.exit_code == 0, human.stderr
    assert "attacked" not in human.stderr and image.stat().st_mtime_ns == mtime
    assert "before → under attack" in human.stdout and "images (erased)" in human.stdout


def test_concept_inversion_learns_from_the_runs_images(tmp_path, run_dir, run_cli, seen_metric):
    out = tmp_path / "out"
    result = run_cli("eval", *TINY, "-m", seen_metric, "--unet", run_dir, "-p", "a photo of an apple", *FAST,
                     "--attack", "concept-inversion", "--attack-steps", "2", "--output-dir", out, "--json")
    assert result.exit_code == 0, result.stderr
    from safetensors.torch import load_file

    (token,) = load_file(str(out / "attacks" / "erased+concept-inversion" / "embeddings.safetensors"))
    (row,) = read_csv(out / "attacks" / "erased+concept-inversion" / "prompts.csv")
    assert row["prompt"] == f"a photo of an {token}" and row["source_prompt"] == "a photo of an apple"
    assert (out / "images" / "erased+concept-inversion" / "a_photo_of_an_apple_0_0.png").is_file()


# bad input ---------------------------------------------------------------------------------

@pytest.mark.parametrize("extra, message", [
    (["-p", "x", "--attack", "nosuch"], "unknown attack 'nosuch' — --attack takes one of: none, concept-inversion, unlearndiffatk"),
    (["--images", "IMAGES", "--attack", "unlearndiffatk"], "--images gives finished images: there is nothing to attack"),
    (["-p", "x", "--unet", "RUN", "--attack", "unlearndiffatk"], "needs the base model's image of every prompt to aim at — add --compare base"),
    (["-p", "x", "--attack", "concept-inversion"], "but which concept?"),
    (["-p", "x", "--attack", "concept-inversion", "--target", "apple"], "no erase run is evaluated — pass --attack-images"),
    (["-p", "x", "--attack", "unlearndiffatk", "--attack-steps", "0"], "--attack-steps must be at least 1"),
    (["-p", "x", "--attack", "unlearndiffatk", "--attack-lr", "1e30"], "--attack-lr must be greater than 0 and at most 1"),
    (["-p", "x", "--attack", "unlearndiffatk", "--attack-lr", "nan"], "--attack-lr must be a finite number"),
    (["-p", "x", "--attack", "unlearndiffatk", "--attack-tokens", "0"], "--attack-tokens must be at least 1"),
    (["-p", "x", "--attack", "unlearndiffatk", "--attack-seed", "-1"], "--attack-seed must be at least 0"),
])
def test_bad_attack_input_is_a_usage_error_before_anything_loads(tmp_path, run_dir, run_cli, monkeypatch, extra, message):
    from recare_cli.models import Runtime

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(Runtime, "pipeline", no_loading)
    noise_images(tmp_path / "images", 1)
    extra = [{"IMAGES": tmp_path / "images", "RUN": run_dir}.get(a, a) for a in extra]
    result = run_cli("eval", *TINY, "-m", "clipscore", *extra, "--output-dir", tmp_path / "out")
    assert result.exit_code == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], result.stderr
    assert not (tmp_path / "out").exists()


# rendering the adversarial prompts again with plain `recare generate` ------------------------

def test_generate_renders_concept_inversion_prompts_with_their_embeddings_as_eval_did(tmp_path, run_cli, seen_metric):
    import shlex

    out = tmp_path / "out"
    result = run_cli("eval", *TINY, "-m", seen_metric, "-p", "a photo of an apple", *FAST, "--attack",
                     "concept-inversion", "--attack-steps", "2", "--target", "apple", "--attack-images",
                     noise_images(tmp_path / "apples", 2), "--output-dir", out, "--json")
    assert result.exit_code == 0, result.stderr
    final = json_lines(result)[-1]
    folder = out / "attacks" / "model+concept-inversion"
    assert str(folder / "embeddings.safetensors") in final["files"]
    command = shlex.split(final["generate"]["model+concept-inversion"])
    assert command[:2] == ["recare", "generate"] and str(folder / "embeddings.safetensors") in command
    again = Path(command[command.index("--output-dir") + 1])

    rendered = run_cli(*command[1:], "--quiet")
    assert rendered.exit_code == 0, rendered.stderr
    (name,) = [image.name for image in (out / "images" / "model+concept-inversion").glob("*.png")]
    eval_image = np.asarray(Image.open(out / "images" / "model+concept-inversion" / name))
    assert np.array_equal(np.asarray(Image.open(again / name)), eval_image)

    # Without the embeddings the learned token is text the tokenizer splits: another image.
    without = command[1:command.index("--embeddings")] + command[command.index("--embeddings") + 2:]
    without[without.index("--output-dir") + 1] = str(tmp_path / "without")
    assert run_cli(*without, "--quiet").exit_code == 0
    assert not np.array_equal(np.asarray(Image.open(tmp_path / "without" / name)), eval_image)


def _token_file(path: Path, rows: dict) -> Path:
    from safetensors.torch import save_file

    save_file(rows, str(path), metadata={"tokens": json.dumps(list(rows))})
    return path


@pytest.mark.parametrize("files, message, loads", [
    (["MISSING"], "--embeddings '{MISSING}': no such file — pass an embeddings.safetensors", False),
    (["NOT_SAFETENSORS"], "--embeddings '{NOT_SAFETENSORS}' is not a safetensors file of token embeddings", False),
    (["WIDE"], "holds token 'token_wide' with 48 dimensions, this model's text encoder(s) take 32 — "
               "the tokens were learned on another base model", False),
    (["ONE", "OTHER_ONE"], "--embeddings '{OTHER_ONE}': token 'token_one' is already in this model's vocabulary "
                           "with another meaning", True),
    (["WORD"], "token 'a</w>' is already in this model's vocabulary with another meaning", True),
])
def test_bad_embeddings_files_are_one_line_usage_errors(tmp_path, run_cli, monkeypatch, files, message, loads):
    from recare_cli import models as model_loading

    named = {
        "MISSING": tmp_path / "missing.safetensors",
        "NOT_SAFETENSORS": tmp_path / "tokens.safetensors",
        "WIDE": _token_file(tmp_path / "wide.safetensors", {"token_wide": torch.zeros(48)}),
        "ONE": _token_file(tmp_path / "one.safetensors", {"token_one": torch.zeros(32)}),
        "OTHER_ONE": _token_file(tmp_path / "other.safetensors", {"token_one": torch.ones(32)}),
        "WORD": _token_file(tmp_path / "word.safetensors", {"a</w>": torch.zeros(32)}),
    }
    named["NOT_SAFETENSORS"].write_text("not a tensor file")
    if not loads:
        monkeypatch.setattr(model_loading.runtime, "load_pipeline", lambda *a, **k: pytest.fail("a model was loaded"))
    args = [a for key in files for a in ("--embeddings", named[key])]
    result = run_cli("generate", *TINY, *FAST, "-p", "a cat", *args, "--output-dir", tmp_path / "out")
    assert result.exit_code == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    expected = message.format(**{k: str(v) for k, v in named.items()})
    assert len(lines) == 1 and lines[0].startswith("Error: ") and expected in lines[0], result.stderr
    assert not list((tmp_path / "out").glob("*.png"))
