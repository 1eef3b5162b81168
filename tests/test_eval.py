"""`recare eval`: the metric contract, shared images, results files, --compare deltas, bad input."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from recare_cli import evaluate, pictures
from recare_cli.errors import RecareError
from recare_cli.evaluate import EvalContext, Row
from recare_cli.generate import GenerateSettings, PromptRow
from recare_cli.models import Runtime
from recare_cli.plugins import Metric, registry
from noise_images import noise_images
from test_bad_inputs import one_error_line

TINY = ["--model", "tiny-random", "--device", "cpu"]
FAST = ["--steps", "2", "--height", "64", "--width", "64"]


@pytest.fixture
def extra_metrics():
    """Register test metrics in the live registry (as a plugin would), removed afterwards."""
    added = []

    def add(metric: Metric) -> None:
        registry().metrics[metric.name] = metric
        added.append(metric.name)

    yield add
    for name in added:
        registry().metrics.pop(name, None)


# the contract -------------------------------------------------------------------------------

def test_images_are_generated_once_and_shared_between_metrics(tmp_path, tiny_model, extra_metrics, monkeypatch):
    generated = []
    real_generate = evaluate.context.generate

    def counting_generate(rows, output_dir, *args, **kwargs):
        generated.append(Path(output_dir))
        return real_generate(rows, output_dir, *args, **kwargs)

    monkeypatch.setattr(evaluate.context, "generate", counting_generate)  # where EvalContext calls it
    seen: dict[str, list] = {}

    def mean_grey(ctx: EvalContext) -> list[Row]:
        images = ctx.images()
        seen.setdefault(ctx.label, []).append(images)
        values = []
        for image in images:
            with Image.open(image.path) as img:
                values.append(float(np.asarray(img.convert("L")).mean()))
        rows = [Row({"image": i.file, "prompt": i.prompt}, {"grey": v}, detail=True) for i, v in zip(images, values)]
        return rows + [Row({}, {"grey": sum(values) / len(values), "scale": ctx.option("scale", 1)})]

    extra_metrics(Metric("grey-a", mean_grey))
    extra_metrics(Metric("grey-b", mean_grey))
    report = evaluate.evaluate(
        ["grey-a", "grey-b"], Runtime("tiny-random", device="cpu"), tmp_path / "out",
        prompts=[PromptRow("a red apple")], num_images=2, seed=7,
        generation=GenerateSettings(steps=2, height=64, width=64), options={"scale": 3},
    )
    assert generated == [tmp_path / "out" / "images" / "model"]
    first, second = seen["model"]
    assert first is second
    assert [(i.prompt, i.seed) for i in first] == [("a red apple", 7), ("a red apple", 8)]
    assert all(i.path.parent == tmp_path / "out" / "images" / "model" and i.path.is_file() for i in first)
    summary = report.summary()
    assert [(r["metric"], r["scale"]) for r in summary] == [("grey-a", 3), ("grey-b", 3)]
    assert summary[0]["grey"] == pytest.approx(summary[1]["grey"])

    with open(tmp_path / "out" / "results.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == 2 * (2 + 1)
    assert {row["image"] for row in table if row["detail"] == "1"} == {i.file for i in first}
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["metrics"] == ["grey-a", "grey-b"] and len(saved["results"]) == 6


def test_a_metric_that_breaks_the_contract_is_named(tmp_path, extra_metrics):
    extra_metrics(Metric("sloppy", lambda ctx: {"value": 1}))
    noise_images(tmp_path / "imgs", 1)
    with pytest.raises(RecareError, match="metric 'sloppy' returned dict, not a list of Row"):
        evaluate.evaluate(["sloppy"], Runtime("tiny-random", device="cpu"), tmp_path / "out", images_dir=tmp_path / "imgs")
    assert not (tmp_path / "out" / "results.csv").exists()


def test_deltas_match_rows_by_key_and_skip_non_numbers():
    rows = [
        evaluate.results.flatten("m", "erased", Row({"prompt": "p"}, {"score": 0.25, "label": "cat", "hits": 1})),
        evaluate.results.flatten("m", "base", Row({"prompt": "p"}, {"score": 1.0, "label": "dog", "hits": 3})),
        evaluate.results.flatten("m", "base", Row({"prompt": "q"}, {"score": 2.0})),
    ]
    (delta,) = evaluate.results.deltas(rows, "erased", "base")
    assert evaluate.public(delta) == {"metric": "m", "model": "delta", "prompt": "p", "score": -0.75, "hits": -2,
                                      "detail": False}


# the command --------------------------------------------------------------------------------

def test_compare_base_shows_both_models_and_deltas(tmp_path, tiny_pipe, run_cli):
    import torch
    from safetensors.torch import save_file

    # An "erased" UNet that differs from the base one, so the two image sets differ.
    state = {k: v.clone() for k, v in tiny_pipe.unet.state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    for key, value in state.items():
        if key.endswith("weight"):
            state[key] = value + 0.05 * torch.randn(value.shape, generator=generator)
    save_file(state, str(tmp_path / "erased.safetensors"))

    out = tmp_path / "out"
    args = ["eval", *TINY, "-m", "clipscore", "-m", "care", "--targets", "cat,person", "--unet",
            tmp_path / "erased.safetensors", "--compare", "base", "-p", "a cat on a sofa", *FAST, "--output-dir", out]
    result = run_cli(*args, "--json")
    assert result.exit_code == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    rows = [line for line in lines if "metric" in line and "event" not in line]
    assert {(r["metric"], r["model"]) for r in rows} == {
        (m, label) for m in ("clipscore", "care") for label in ("erased", "base", "delta")}
    assert lines[-1] == {"files": [str(out / "results.csv"), str(out / "results.json"), str(out / "grid.png")]}
    with Image.open(out / "grid.png") as grid:  # one prompt, a row per model
        assert grid.format == "PNG" and grid.height > 2 * pictures.cell_size(64, 64)[1]
    assert sorted(p.name for p in (out / "images").iterdir()) == ["base", "erased"]
    erased_png = np.asarray(Image.open(out / "images" / "erased" / "a_cat_on_a_sofa_0.png"))
    base_png = np.asarray(Image.open(out / "images" / "base" / "a_cat_on_a_sofa_0.png"))
    assert not np.array_equal(erased_png, base_png)

    care = {(r["model"], r["prompt"], r["target"]): r for r in rows if r["metric"] == "care"}
    assert set(care) == {(m, p, t) for m in ("erased", "base", "delta")
                         for p in ("a cat on a sofa", "(all)") for t in ("cat", "person")}
    for key in (("cat",), ("person",)):
        erased, base, delta = (care[(m, "(all)", *key)] for m in ("erased", "base", "delta"))
        assert delta["similarity"] == pytest.approx(erased["similarity"] - base["similarity"])
    assert care[("erased", "(all)", "cat")]["similarity"] != care[("base", "(all)", "cat")]["similarity"]

    # A rerun keeps the images and refuses to replace the results unless told to.
    mtime = (out / "images" / "base" / "a_cat_on_a_sofa_0.png").stat().st_mtime_ns
    again = run_cli(*args)
    assert again.exit_code == 2 and "already exists" in again.stderr and "--overwrite" in again.stderr
    human = run_cli(*args, "--overwrite")
    assert human.exit_code == 0, human.stderr
    assert "care: base → erased (delta)" in human.stdout and "→" in human.stdout
    assert (out / "images" / "base" / "a_cat_on_a_sofa_0.png").stat().st_mtime_ns == mtime


# bad input ----------------------------------------------------------------------------------

def test_unknown_metric_lists_the_known_ones(tmp_path, run_cli):
    result = run_cli("eval", *TINY, "-m", "beauty", "-p", "x", "--output-dir", tmp_path)
    assert result.exit_code == 2
    assert "unknown metric 'beauty'" in result.stderr
    for name in ("care", "clipscore", "fid", "nudity", "object", "style"):
        assert name in result.stderr


def test_no_metric_and_no_images_are_usage_errors(tmp_path, run_cli):
    result = run_cli("eval", *TINY, "-p", "x", "--output-dir", tmp_path)
    assert result.exit_code == 2 and "no metric given" in result.stderr
    result = run_cli("eval", *TINY, "-m", "nudity", "--output-dir", tmp_path)
    assert result.exit_code == 2 and "no images to evaluate" in result.stderr


def test_empty_image_dir(tmp_path, run_cli):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    result = run_cli("eval", *TINY, "-m", "nudity", "--images", tmp_path / "empty", "--output-dir", tmp_path / "out")
    assert result.exit_code == 2
    assert "--images" in result.stderr and "holds no images" in result.stderr
    assert result.stderr.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_a_missing_unet_fails_before_anything_is_written(tmp_path, run_cli):
    result = run_cli("eval", *TINY, "-m", "nudity", "-p", "x", "--unet", tmp_path / "nope.safetensors",
                     "--output-dir", tmp_path / "out")
    assert result.exit_code == 2 and "--unet" in result.stderr and "no such file" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("second, code, message", [
    (["-m", "clipscore", "--clip-model", "nosuch"], 2, "--clip-model 'nosuch' is not an open_clip model"),
    (["-m", "care", "--targets", "person", "--clip-model", "ViT-B-32"], 3, "CLIP weights ViT-B-32/openai are not cached"),
    (["-m", "care", "--targets", "unicorn", "--clip-model", "tiny-random"], 2, "--targets: 'unicorn' not among"),
    (["-m", "object", "--target", "cat"], 3, "ImageNet ResNet-50 classifier weights are not available offline"),
    (["-m", "object", "--target", "unicorn", "--zero-shot", "--clip-model", "tiny-random"], 2,
     "--target 'unicorn' is not one of the classifier's 1000 classes"),
    (["-m", "fid", "--reference-dir", "NOWHERE", "--inception-weights", "WEIGHTS"], 2, "--reference-dir"),
    (["-m", "fid", "--reference-dir", "IMAGES"], 3, "Inception v3 (FID) weights are not available offline"),
    (["-m", "style", "--classifier-weights", "IMAGES", "--target", "x"], 1, "is not an image-classification checkpoint"),
    (["-m", "toy", "--target", "unicorn"], 2, "--target 'unicorn' is not a toy-world concept"),
])
def test_every_metric_is_checked_before_any_image_is_made(tmp_path, run_cli, monkeypatch, second, code, message):
    """A mistake in the last metric used to surface only after the images (and the metrics before it)."""
    from recare_cli.models import Runtime

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(Runtime, "pipeline", no_loading)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no ResNet or Inception weights there
    noise_images(tmp_path / "imgs", 2)
    (tmp_path / "weights.pth").write_bytes(b"")
    second = [{"NOWHERE": tmp_path / "nowhere", "IMAGES": tmp_path / "imgs", "WEIGHTS": tmp_path / "weights.pth"}
              .get(a, a) for a in second]
    result = run_cli("eval", *TINY, "--offline", "-m", "nudity", *second, "-p", "a cat",
                     "--output-dir", tmp_path / "out")
    assert result.exit_code == code, result.stderr
    assert message in one_error_line(result.stderr)
    assert not (tmp_path / "out").exists()


def test_a_plugin_metrics_check_runs_before_any_image(tmp_path, extra_metrics):
    checked = []

    def check(ctx: EvalContext) -> None:
        checked.append(ctx.label)
        raise RecareError("not today")

    extra_metrics(Metric("picky", lambda ctx: ctx.images() and [], check=check))
    with pytest.raises(RecareError, match="not today"):
        evaluate.evaluate(["nudity", "picky"], Runtime("tiny-random", device="cpu"), tmp_path / "out",
                          prompts=[PromptRow("a cat")])
    assert checked == ["model"] and not (tmp_path / "out").exists()


@pytest.mark.parametrize("metric, needed", [
    ("care", "--targets"), ("object", "--target"), ("fid", "--reference-dir"),
    ("style", "--classifier-weights and --target"),
])
def test_a_metrics_required_option_is_checked_first(tmp_path, run_cli, metric, needed):
    noise_images(tmp_path / "imgs", 1)
    result = run_cli("eval", *TINY, "-m", "nudity", "-m", metric, "--images", tmp_path / "imgs",
                     "--output-dir", tmp_path / "out")
    assert result.exit_code == 2
    assert f"metric '{metric}' needs {needed}" in result.stderr
    assert not (tmp_path / "out" / "results.csv").exists()


def test_clipscore_needs_prompts_for_a_bare_folder(tmp_path, run_cli):
    noise_images(tmp_path / "imgs", 2)
    result = run_cli("eval", *TINY, "-m", "clipscore", "--images", tmp_path / "imgs", "--output-dir", tmp_path / "out")
    assert result.exit_code == 2
    assert "clipscore needs each image's prompt" in result.stderr and "manifest.jsonl" in result.stderr


def test_compare_needs_prompts_and_a_different_model(tmp_path, run_cli):
    noise_images(tmp_path / "imgs", 1)
    result = run_cli("eval", *TINY, "-m", "nudity", "--images", tmp_path / "imgs", "--compare", "base",
                     "--output-dir", tmp_path / "out")
    assert result.exit_code == 2 and "needs the prompts" in result.stderr
    result = run_cli("eval", *TINY, "-m", "nudity", "-p", "x", "--compare", "base", "--output-dir", tmp_path / "out")
    assert result.exit_code == 2 and "--compare base compares with --model itself" in result.stderr


def test_compare_with_another_model_evaluates_that_model(tmp_path, tiny_model, run_cli):
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    # Another model: tiny-random's folder with a perturbed UNet.
    other = tmp_path / "other-model"
    shutil.copytree(tiny_model, other)
    unet_file = other / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(unet_file))
    generator = torch.Generator().manual_seed(1)
    save_file({k: v + 0.05 * torch.randn(v.shape, generator=generator) if k.endswith("weight") else v
               for k, v in state.items()}, str(unet_file))

    out = tmp_path / "out"
    result = run_cli("eval", *TINY, "-m", "clipscore", "--compare", other, "-p", "a cat on a sofa", *FAST,
                     "--output-dir", out, "--json")
    assert result.exit_code == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines() if '"metric"' in line]
    models = {r["model"] for r in rows}
    assert len(models) == 3 and "delta" in models
    folders = sorted(p.name for p in (out / "images").iterdir())
    assert len(folders) == 2
    # The compared model's images are the other model's own, not the base's.
    alone = tmp_path / "alone"
    result = run_cli("generate", "--model", other, "--device", "cpu", "-p", "a cat on a sofa", *FAST,
                     "--output-dir", alone, "--quiet")
    assert result.exit_code == 0, result.stderr
    drawn = np.asarray(Image.open(alone / "a_cat_on_a_sofa_0.png"))
    matches = [f for f in folders if np.array_equal(np.asarray(Image.open(out / "images" / f / "a_cat_on_a_sofa_0.png")), drawn)]
    assert len(matches) == 1
    scores = {r["model"]: r["clipscore"] for r in rows if r.get("prompt") in ("(all)", None) and "clipscore" in r}
    (first, second) = sorted(m for m in scores if m != "delta")
    assert scores["delta"] == pytest.approx(scores[first] - scores[second]) or \
        scores["delta"] == pytest.approx(scores[second] - scores[first])
