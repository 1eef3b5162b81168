"""`--offline` is what keeps recare off the network, and without it a missing hub model is downloaded.

The test session sets HF_HUB_OFFLINE=1 for every other test (conftest.py); here it is unset, in the
environment and in huggingface_hub's constants (read once at import), and every socket connection
is refused and recorded instead.
"""

from __future__ import annotations

import socket

import pytest

REPO = "someone/not-in-the-cache"


@pytest.fixture
def network(monkeypatch, tmp_path):
    """Online as far as recare and huggingface_hub can tell; every connection attempt is recorded and fails."""
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # an empty hub cache
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network blocked by the test")

    monkeypatch.setattr(socket.socket, "connect", lambda self, address: refuse(address))
    monkeypatch.setattr(socket.socket, "connect_ex", lambda self, address: refuse(address))
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return attempts


def _generate(run_cli, out, *extra):
    return run_cli("generate", "-p", "a cat", "--model", REPO, "--device", "cpu", "--height", "64", "--width", "64",
                   "--steps", "1", "--output-dir", out, "--quiet", *extra)


def test_the_network_block_is_real(network):
    with pytest.raises(OSError):
        socket.create_connection(("huggingface.co", 443))
    assert network


def test_offline_flag_makes_no_network_call(run_cli, network, tmp_path):
    result = _generate(run_cli, tmp_path, "--offline")
    assert result.exit_code == 3, result.stderr
    assert "offline mode is on" in result.stderr
    assert network == []


def test_without_the_flag_a_missing_model_is_downloaded(run_cli, network, tmp_path, monkeypatch):
    result = _generate(run_cli, tmp_path / "a")
    assert result.exit_code == 3, result.stderr
    assert "could not be downloaded" in result.stderr
    assert network, "the download reached the socket layer"


def test_the_download_asks_for_the_pipeline_files_only(run_cli, network, tmp_path, monkeypatch, tiny_model):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError
    from huggingface_hub.utils import filter_repo_objects

    calls = []

    def snapshot_download(repo_id, **kwargs):  # the hub, stubbed: not cached, then "downloaded" tiny-random
        calls.append((repo_id, kwargs))
        if kwargs.get("local_files_only"):
            raise LocalEntryNotFoundError("not cached")
        return str(tiny_model)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    result = _generate(run_cli, tmp_path)
    assert result.exit_code == 0, result.stderr
    assert {repo for repo, _ in calls} == {REPO} and calls[0][1]["local_files_only"] is True  # the cache first
    downloads = [kw for _, kw in calls if not kw.get("local_files_only")]
    assert downloads and all(kw["allow_patterns"] == downloads[0]["allow_patterns"] for kw in downloads)
    patterns = downloads[0]["allow_patterns"]
    # What CompVis/stable-diffusion-v1-4 holds: a pipeline needs the first group and must not fetch the rest.
    needed = ["model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
              "vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors", "tokenizer/vocab.json",
              "tokenizer/merges.txt", "tokenizer/special_tokens_map.json", "scheduler/scheduler_config.json",
              "feature_extractor/preprocessor_config.json", "safety_checker/model.safetensors"]
    unwanted = ["sd-v1-4.ckpt", "sd-v1-4-full-ema.ckpt", "unet/diffusion_pytorch_model.bin",
                "unet/diffusion_pytorch_model.fp16.bin", "safety_checker/pytorch_model.bin",
                "text_encoder/flax_model.msgpack", "vae/diffusion_flax_model.msgpack", "v1-variants-scores.jpg"]
    assert list(filter_repo_objects(needed + unwanted, allow_patterns=patterns)) == needed
    assert network == []
