"""The shared CLIP loader: the built-in tiny-random CLIP, local folders and checkpoints, offline
errors, the exact cut of padding in text encoding, and the cached vocabulary embeddings."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch

from recare_cli.clip import ClipModel, cache_slug, builtin_clip_path, load_clip, vocab_embeddings
from recare_cli.errors import ModelNotAvailable, RecareError, UsageError


@pytest.fixture(scope="module")
def tiny_clip(cache_dir) -> ClipModel:
    return load_clip("tiny-random", cache_dir=cache_dir)


def test_tiny_random_encodes_normalised_embeddings(tiny_clip):
    from PIL import Image

    text = tiny_clip.encode_text(["a photo of a cat", "a dog", "Van Gogh"], batch_size=2)
    images = tiny_clip.encode_images([Image.new("RGB", (50, 30), (255, 0, 0)), Image.new("L", (20, 20), 128)])
    for embeddings, n in ((text, 3), (images, 2)):
        assert embeddings.dtype == torch.float32 and embeddings.shape == (n, 32)
        assert torch.allclose(embeddings.norm(dim=1), torch.ones(n), atol=1e-5)
    assert not torch.allclose(text[0], text[1])
    assert tiny_clip.logit_scale == pytest.approx(1 / 0.07, rel=1e-4)
    assert tiny_clip.key.startswith("tiny-random:")


def test_tiny_random_is_deterministic_and_loads_like_a_user_folder(tiny_clip, tmp_path):
    rebuilt = builtin_clip_path("tiny-random", tmp_path / "other-cache")[0]
    assert (rebuilt / "open_clip_model.safetensors").read_bytes() == \
        (builtin_clip_path("tiny-random", None)[0] / "open_clip_model.safetensors").read_bytes()
    user_folder = tmp_path / "my-clip"
    shutil.copytree(rebuilt, user_folder)
    from_folder = load_clip(str(user_folder))
    texts = ["a red car", "sky"]
    assert torch.equal(from_folder.encode_text(texts), tiny_clip.encode_text(texts))
    assert from_folder.key != tiny_clip.key and from_folder.key.startswith("local-dir:")


def test_cutting_padding_after_end_of_text_is_exact(tiny_clip):
    texts = ["hello</w>", "a", "A painting in the style of Van Gogh with a starry night over a quiet river town"]
    tokens = tiny_clip.tokenizer(texts)
    with torch.no_grad():
        full = tiny_clip.model.encode_text(tokens)
    cut = tiny_clip._encode_tokens(tokens)
    assert torch.allclose(cut, full, atol=1e-5)
    reordered = tiny_clip.encode_text(list(reversed(texts)), batch_size=1)
    assert torch.allclose(reordered.flip(0), torch.nn.functional.normalize(full, dim=-1), atol=1e-5)


def test_vocab_embeddings_are_cached_per_model_and_vocabulary(tiny_clip, tmp_path, monkeypatch):
    tokens = ["tree</w>", "sky</w>", "river</w>"]
    first = vocab_embeddings(tiny_clip, tokens, cache_dir=tmp_path)
    assert first.dtype == torch.float16 and first.shape == (3, 32)
    assert torch.allclose(first.float(), tiny_clip.encode_text(tokens), atol=2e-3)
    folder = tmp_path / "clip" / cache_slug(tiny_clip.key)
    files = list(folder.glob("vocab-*.safetensors"))
    assert len(files) == 1

    def no_encoding(*args, **kwargs):
        raise AssertionError("the cache should have answered")

    monkeypatch.setattr(ClipModel, "encode_text", no_encoding)
    assert torch.equal(vocab_embeddings(tiny_clip, tokens, cache_dir=tmp_path), first)
    monkeypatch.undo()

    files[0].write_bytes(b"damaged")
    assert torch.equal(vocab_embeddings(tiny_clip, tokens, cache_dir=tmp_path), first)
    assert vocab_embeddings(tiny_clip, tokens[:2], cache_dir=tmp_path).shape == (2, 32)
    assert len(list(folder.glob("vocab-*.safetensors"))) == 2


def test_offline_without_weights_names_what_to_supply(monkeypatch):
    with pytest.raises(ModelNotAvailable) as info:
        load_clip("ViT-B-32", "openai", offline=True)
    assert "--clip-pretrained /path/to/open_clip_pytorch_model.bin" in info.value.hint
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotAvailable):
        load_clip("ViT-B-32", "openai")


def test_bad_names_and_checkpoints(tmp_path):
    with pytest.raises(UsageError, match="not an open_clip model"):
        load_clip("ViT-Nope-99")
    with pytest.raises(UsageError) as info:
        load_clip("ViT-B-32", "no-such-tag")
    assert "openai" in info.value.hint
    with pytest.raises(RecareError, match="has no open_clip_config.json"):
        load_clip(str(tmp_path))
    broken = tmp_path / "weights.bin"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(RecareError, match="could not load CLIP weights"):
        load_clip("RN50", str(broken))


def test_importing_the_cli_module_does_not_import_torch():
    code = "import sys, recare_cli.cli.careset, recare_cli.careset, recare_cli.clip; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
