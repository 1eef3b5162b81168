"""Every command on a Stable Diffusion 1.4 as the hub delivers it: HF cache layout, safety checker, feature extractor.

The built-in test models have neither `safety_checker/` nor `feature_extractor/`; every SD 1.4/1.5
checkpoint people use has both, and single-file export once failed on them. The pipeline is laid
out in a fresh HF_HOME by the test (tests/hub_layout.py), offline, and named by its hub id.
"""

from __future__ import annotations

import json

import pytest

from hub_layout import REPO_ID, REVISION, hub_cache_copy
from noise_images import noise_images

CARESET = {"nudity_care_word": ["A man", "A woman"], "nudity_care_word_photo": ["A photo of man", "A photo of woman"]}
SMALL = ["--device", "cpu", "--quiet"]


@pytest.fixture(scope="module")
def hub(tmp_path_factory, tiny_model):
    """HF_HOME holding only the hub-shaped SD 1.4, offline; yields the snapshot folder."""
    hf_home = tmp_path_factory.mktemp("hf-home")
    snapshot = hub_cache_copy(tiny_model, hf_home)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HOME", str(hf_home))
        patch.delenv("HF_HUB_CACHE", raising=False)
        patch.setenv("HF_HUB_OFFLINE", "1")
        yield snapshot


@pytest.fixture(scope="module")
def erased_run(hub, tmp_path_factory):
    """A smoke-size ReCARE run on the hub model (images and CARE set given, so no CLIP download)."""
    from typer.testing import CliRunner

    from recare_cli.cli import app

    root = tmp_path_factory.mktemp("hub-erase")
    images = noise_images(root / "images", 2, 32)
    careset = root / "careset.json"
    careset.write_text(json.dumps(CARESET))
    out = root / "run"
    args = ["erase", "--concept", "nudity", "--model", REPO_ID, "--resolution", "64", "--iterations", "1",
            "--ti-steps", "1", "--rounds", "1", "--prefix-steps", "1", "--images", images, "--careset", careset,
            "--output-dir", out, *SMALL]
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.stderr
    return out


def test_the_fixture_is_the_hub_cache_layout(hub):
    from recare_cli.models import resolve_model

    repo = hub.parents[1]
    assert (repo / "refs" / "main").read_text() == REVISION
    assert (hub / "safety_checker" / "config.json").is_symlink()
    assert (hub / "feature_extractor" / "preprocessor_config.json").resolve().parent == repo / "blobs"
    index = json.loads((hub / "model_index.json").read_text())
    assert index["safety_checker"] == ["stable_diffusion", "StableDiffusionSafetyChecker"]
    assert index["feature_extractor"] == ["transformers", "CLIPImageProcessor"]
    ref = resolve_model(REPO_ID)
    assert ref.kind == "hub" and ref.revision == REVISION and ref.path == hub


def test_generate(run_cli, hub, tmp_path):
    result = run_cli("generate", "-p", "a photo of a cat", "--model", REPO_ID, "--height", "64", "--width", "64",
                     "--steps", "2", "--output-dir", tmp_path, *SMALL)
    assert result.exit_code == 0, result.stderr
    assert len(list(tmp_path.glob("*.png"))) == 1


def test_erase_records_the_hub_model(erased_run):
    manifest = json.loads((erased_run / "recare-run.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["model"]["model"] == REPO_ID and manifest["model"]["revision"] == REVISION
    from safetensors import safe_open

    with safe_open(str(erased_run / "unet.safetensors"), framework="pt") as handle:  # what export reads back
        assert (handle.metadata()["base_model"], handle.metadata()["base_revision"]) == (REPO_ID, REVISION)


def test_eval(run_cli, erased_run, tmp_path):
    result = run_cli("eval", "-m", "clipscore", "--clip-model", "tiny-random", "--model", REPO_ID,
                     "--unet", erased_run, "-p", "a photo of a cat", "--steps", "2", "--height", "64", "--width", "64",
                     "--output-dir", tmp_path, *SMALL)
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "results.json").is_file()


@pytest.mark.parametrize("fmt,name", [("unet", "unet.safetensors"), ("single-file", "model.safetensors"),
                                      ("lora", "lora.safetensors"), ("tokens", "tokens")])
def test_export(run_cli, erased_run, tmp_path, fmt, name):
    # --model given as typed, as the report did; the run records the same base.
    result = run_cli("export", erased_run, "-f", fmt, "-o", tmp_path / name, "--model", REPO_ID, "--json", "--device", "cpu")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1])["base_model"] == REPO_ID
    assert (tmp_path / name).exists()


def test_diffusers_export_keeps_the_safety_checker(run_cli, hub, erased_run, tmp_path):
    import torch
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    out = tmp_path / "pipe"
    result = run_cli("export", erased_run, "-f", "diffusers", "-o", out, "--device", "cpu", "--quiet")
    assert result.exit_code == 0, result.stderr
    index = json.loads((out / "model_index.json").read_text())
    assert index["safety_checker"] == ["stable_diffusion", "StableDiffusionSafetyChecker"]
    assert index["feature_extractor"] == ["transformers", "CLIPImageProcessor"]
    assert index["requires_safety_checker"] is True
    base_checker = load_file(str(hub / "safety_checker" / "model.safetensors"))
    exported_checker = load_file(str(out / "safety_checker" / "model.safetensors"))
    assert base_checker.keys() == exported_checker.keys()
    assert all(torch.equal(base_checker[k], exported_checker[k]) for k in base_checker)
    assert (json.loads((out / "feature_extractor" / "preprocessor_config.json").read_text())
            == json.loads((hub / "feature_extractor" / "preprocessor_config.json").read_text()))
    loaded = StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    assert type(loaded.safety_checker).__name__ == "StableDiffusionSafetyChecker"


def test_diffusers_export_without_the_safety_checker_when_asked(run_cli, erased_run, tmp_path):
    out = tmp_path / "pipe"
    result = run_cli("export", erased_run, "-f", "diffusers", "-o", out, "--no-safety-checker", "--device", "cpu",
                     "--dtype", "fp16", "--quiet")
    assert result.exit_code == 0, result.stderr
    index = json.loads((out / "model_index.json").read_text())
    assert index["safety_checker"] == [None, None] and index["requires_safety_checker"] is False
    assert not (out / "safety_checker").exists()
