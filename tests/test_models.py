"""Resolving and loading `--model` and `--unet`: built-ins, folders, the HF cache, erased weights."""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from recare_cli import cache, models
from recare_cli.errors import ModelNotAvailable, RecareError, UsageError
from recare_cli.models.runtime import has_glibc_malloc

TINY_ARGS = ("--model", "tiny-random", "--device", "cpu", "--height", "64", "--width", "64", "--steps", "2")


# built-ins ---------------------------------------------------------------------------------------

def test_builtin_is_written_once_and_rebuilt_when_stale(tmp_path, tiny_model):
    folder = models.builtin_path("tiny-random", tmp_path)
    assert folder == tmp_path / "models" / "tiny-random"
    assert (folder / "model_index.json").is_file()
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    first_build = weights.stat().st_mtime_ns

    assert models.builtin_path("tiny-random", tmp_path) == folder
    assert weights.stat().st_mtime_ns == first_build

    stamp = folder / "recare-builtin.json"
    stamp.write_text(json.dumps({"name": "tiny-random", "config_sha256": "stale"}))
    models.builtin_path("tiny-random", tmp_path)
    assert weights.stat().st_mtime_ns != first_build
    assert json.loads(stamp.read_text())["config_sha256"] != "stale"
    # Seeded: every build, here and in the session cache, holds the same weights.
    assert weights.read_bytes() == (tiny_model / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert not [p for p in (tmp_path / "models").iterdir() if p.name.startswith(".")]


def test_tiny_random_has_the_specified_architecture(tiny_pipe):
    assert list(tiny_pipe.unet.config.block_out_channels) == [32, 32, 64]
    assert tiny_pipe.unet.config.cross_attention_dim == 32
    assert tiny_pipe.vae_scale_factor == 8
    assert len(tiny_pipe.tokenizer) == 49408
    assert tiny_pipe.text_encoder.config.hidden_size == 32
    assert type(tiny_pipe.scheduler).__name__ == "PNDMScheduler"


# --model resolution --------------------------------------------------------------------------

def test_resolve_builtin_and_folder(tiny_model, tmp_path):
    ref = models.resolve_model("tiny-random")
    assert (ref.spec, ref.kind, ref.path) == ("tiny-random", "builtin", tiny_model)
    ref = models.resolve_model(str(tiny_model))
    assert (ref.spec, ref.kind, ref.path) == (str(tiny_model), "folder", tiny_model)
    # --cache-dir: the built-in is the one in that cache (a copy of a finished build, so none runs)
    other_cache = tmp_path / "other-cache"
    shutil.copytree(tiny_model, other_cache / "models" / "tiny-random")
    assert models.resolve_model("tiny-random", other_cache).path == other_cache / "models" / "tiny-random"


def test_folder_without_model_index_is_not_a_model(tmp_path):
    with pytest.raises(RecareError, match="no model_index.json") as err:
        models.resolve_model(str(tmp_path))
    assert err.value.exit_code == 1


@pytest.mark.parametrize("name, content", [("weights.bin", b"x"), ("broken.safetensors", b"garbage")])
def test_file_that_is_not_a_checkpoint(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(RecareError) as err:
        models.resolve_model(str(path))
    assert err.value.exit_code == 1  # a bad file, not a model that could be fetched


def test_readable_safetensors_is_a_single_file_checkpoint(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    save_file({"model.diffusion_model.w": torch.zeros(1)}, str(path))
    ref = models.resolve_model(str(path))
    assert (ref.spec, ref.kind, ref.path) == (str(path), "single-file", path)


def test_a_ckpt_of_tensors_is_a_single_file_checkpoint(tmp_path):
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.w": torch.zeros(1)}}, path)
    ref = models.resolve_model(str(path))
    assert (ref.spec, ref.kind, ref.path) == (str(path), "single-file", path)


def test_unknown_name_is_not_available(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelNotAvailable, match="built-ins: tiny-random"):
        models.resolve_model("no-such-model")


# the Hugging Face cache ------------------------------------------------------------------------

REVISION = "0123456789abcdef0123456789abcdef01234567"


def add_to_hub_cache(home: Path, repo_id: str, folder: Path) -> Path:
    """Store `folder` as `repo_id`'s main revision, in the layout huggingface_hub writes; its snapshot folder."""
    repo = home / "hub" / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / REVISION
    shutil.copytree(folder, snapshot, ignore=shutil.ignore_patterns("recare-builtin.json"))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    return snapshot


@pytest.fixture
def hf_home(tmp_path, monkeypatch, tiny_model) -> Path:
    """An HF_HOME whose hub cache holds tiny-random as `org/tiny-sd`."""
    home = tmp_path / "hf-home"
    add_to_hub_cache(home, "org/tiny-sd", tiny_model)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    return home


def test_hub_id_resolves_from_the_cache_offline(hf_home):
    ref = models.resolve_model("org/tiny-sd", offline=True)
    assert ref.kind == "hub"
    assert ref.revision == REVISION
    assert ref.path == hf_home / "hub" / "models--org--tiny-sd" / "snapshots" / REVISION


def test_hf_hub_cache_overrides_hf_home(hf_home, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    with pytest.raises(ModelNotAvailable):
        models.resolve_model("org/tiny-sd", offline=True)
    monkeypatch.setenv("HF_HUB_CACHE", str(hf_home / "hub"))
    assert models.resolve_model("org/tiny-sd", offline=True).revision == REVISION


def test_hub_id_not_cached_offline(hf_home, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotAvailable, match="'org/other' is not in the local Hugging Face cache") as err:
        models.resolve_model("org/other", offline=False)
    assert err.value.exit_code == 3
    assert "hf download org/other" in err.value.hint


OFFLINE_SCRIPT = """
import json, socket
attempts = []

def refuse(*args, **kwargs):
    attempts.append(repr(args[:1]))
    raise OSError("the test allows no network")

socket.getaddrinfo = refuse
socket.socket.connect = lambda self, *args: refuse(*args)
from recare_cli.errors import ModelNotAvailable
from recare_cli.models import resolve_model

cached = resolve_model("org/tiny-sd", offline=True)
try:
    resolve_model("org/other", offline=True)
    missing = "resolved"
except ModelNotAvailable:
    missing = "not available"
print(json.dumps({"revision": cached.revision, "missing": missing, "attempts": attempts}))
"""


def test_offline_touches_no_network_even_without_hf_hub_offline(hf_home):
    # Plugins and scripts call the core with offline=True and may not set HF_HUB_OFFLINE, which
    # this test session sets for huggingface_hub at import: a process of its own, without it.
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_HUB_CACHE")}
    env["HF_HOME"] = str(hf_home)
    done = subprocess.run([sys.executable, "-c", OFFLINE_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"revision": REVISION, "missing": "not available", "attempts": []}


def test_a_hub_id_not_cached_is_downloaded_with_the_pipeline_files_only(hf_home, tiny_model, monkeypatch):
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE")
    calls = []

    def fake_snapshot_download(repo_id, **kwargs):  # the hub, as far as recare sees it
        calls.append((repo_id, kwargs))
        if kwargs.get("local_files_only"):
            raise FileNotFoundError("not in the cache")
        return str(add_to_hub_cache(hf_home, repo_id, tiny_model))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    ref = models.resolve_model("org/new-sd")
    assert (ref.spec, ref.kind, ref.revision) == ("org/new-sd", "hub", REVISION)
    assert ref.path == hf_home / "hub" / "models--org--new-sd" / "snapshots" / REVISION
    # the download skips the multi-GB .ckpt files SD repos also hold
    assert calls[-1] == ("org/new-sd", {"cache_dir": hf_home / "hub", "allow_patterns": models.resolve.HUB_PATTERNS})
    assert not any(fnmatch.fnmatch("sd-v1-4.ckpt", pattern) for pattern in calls[-1][1]["allow_patterns"])


@pytest.mark.parametrize("value, offline", [("1", True), ("true", True), ("TRUE", True), ("yes", True), ("On", True),
                                            ("0", False), ("false", False), ("", False), (None, False)])
def test_hf_hub_offline_values(monkeypatch, value, offline):
    if value is None:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    else:
        monkeypatch.setenv("HF_HUB_OFFLINE", value)
    assert models.is_offline(False) is offline
    assert models.is_offline(True) is True


def test_the_hub_cache_defaults_to_the_home_folder(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert models.resolve.hub_cache_dir() == tmp_path / ".cache" / "huggingface" / "hub"


def test_cli_generates_from_a_cached_hub_id(hf_home, tmp_path, run_cli):
    out = tmp_path / "images"
    args = [a if a != "tiny-random" else "org/tiny-sd" for a in TINY_ARGS]
    result = run_cli("generate", "--prompt", "a cat", *args, "--offline", "--output-dir", out)
    assert result.exit_code == 0, result.stderr
    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [(m["file"], m["model"]) for m in manifest] == [("a_cat_0.png", "org/tiny-sd")]


def test_cli_hub_id_not_cached_exits_3(hf_home, tmp_path, run_cli):
    out = tmp_path / "images"
    result = run_cli("generate", "--prompt", "a cat", "--model", "org/missing", "--offline", "--output-dir", out)
    assert result.exit_code == 3
    assert result.stderr.startswith("Error: model 'org/missing' is not in the local Hugging Face cache")
    assert len(result.stderr.splitlines()) == 1
    assert not out.exists()


# single-file checkpoints -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ldm_checkpoint(tiny_pipe, tmp_path_factory) -> Path:
    """tiny-random in the original (LDM) single-file layout, as community checkpoints are."""
    from safetensors.torch import save_file

    from recare_cli.export import pipeline_to_ldm

    path = tmp_path_factory.mktemp("single-file") / "tiny-ldm.safetensors"
    save_file({k: v.contiguous() for k, v in pipeline_to_ldm(tiny_pipe).items()}, str(path))
    return path


def test_single_file_loads_with_a_local_config(ldm_checkpoint, tiny_model, tiny_pipe):
    ref = models.resolve_model(str(ldm_checkpoint))
    pipe = models.load_pipeline(ref, offline=True, single_file_config=str(tiny_model))
    _assert_same_state(pipe.unet.state_dict(), tiny_pipe.unet.state_dict())
    _assert_same_state(pipe.text_encoder.state_dict(), tiny_pipe.text_encoder.state_dict())


def test_cli_single_file_takes_base_configs_from_the_hf_cache(ldm_checkpoint, hf_home, tiny_model, tmp_path,
                                                               run_cli):
    args = [a if a != "tiny-random" else str(ldm_checkpoint) for a in TINY_ARGS]
    missing = run_cli("generate", "--prompt", "a cat", *args, "--offline", "--output-dir", tmp_path / "none")
    assert missing.exit_code == 3
    assert "base model's configs in the Hugging Face cache" in missing.stderr
    assert len(missing.stderr.splitlines()) == 1
    assert not (tmp_path / "none").exists()

    # diffusers recognises the layout as SD 1.x and reads that repo's configs: here, tiny-random's.
    add_to_hub_cache(hf_home, "stable-diffusion-v1-5/stable-diffusion-v1-5", tiny_model)
    single = tmp_path / "single"
    assert run_cli("generate", "--prompt", "a cat", *args, "--offline", "--output-dir", single).exit_code == 0
    folder = tmp_path / "folder"
    assert run_cli("generate", "--prompt", "a cat", *TINY_ARGS, "--output-dir", folder).exit_code == 0
    assert (single / "a_cat_0.png").read_bytes() == (folder / "a_cat_0.png").read_bytes()


# devices, dtypes, schedulers -----------------------------------------------------------------

def test_devices_and_dtypes():
    assert models.resolve_device("cpu") == "cpu"
    if not torch.cuda.is_available():
        assert models.resolve_device("auto") in ("cpu", "mps")
        with pytest.raises(UsageError, match="CUDA is not available"):
            models.resolve_device("cuda:0")
    for bad in ("gpu", "cuda:x"):
        with pytest.raises(UsageError, match="is not a device"):
            models.resolve_device(bad)
    assert models.resolve_dtype("auto", "cpu") == torch.float32
    assert models.resolve_dtype("auto", "cuda:1") == torch.float16
    assert models.resolve_dtype("bf16", "cpu") == torch.bfloat16
    with pytest.raises(UsageError):
        models.resolve_dtype("fp64", "cpu")


def test_scheduler_is_swapped_with_the_model_config(tiny_pipe):
    class Holder:
        scheduler = tiny_pipe.scheduler

    holder = Holder()
    models.set_scheduler(holder, "ddim")
    assert type(holder.scheduler).__name__ == "DDIMScheduler"
    assert holder.scheduler.config.beta_schedule == "scaled_linear"
    assert holder.scheduler.config.steps_offset == 1
    with pytest.raises(UsageError, match="unknown scheduler 'fast'"):
        models.set_scheduler(holder, "fast")


# --unet: erased weights ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def erased_state(tiny_pipe) -> dict:
    """A UNet state dict that differs from tiny-random's, as an erased model's would."""
    generator = torch.Generator().manual_seed(7)
    return {k: v + 0.05 * torch.randn(v.shape, generator=generator) for k, v in tiny_pipe.unet.state_dict().items()}


@pytest.fixture(scope="module")
def foreign_unet_file(tmp_path_factory) -> Path:
    """Weights of a UNet with another architecture (two levels, wider, 64-dim cross-attention)."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=32, cross_attention_dim=64,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=4,
    )
    path = tmp_path_factory.mktemp("foreign") / "foreign.safetensors"
    save_file(unet.state_dict(), str(path))
    return path


def _assert_same_state(loaded: dict, expected: dict) -> None:
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)


@pytest.mark.parametrize("wrap", [
    lambda s: s,  # the reference release: torch.save(unet.state_dict())
    lambda s: {"state_dict": s},
    lambda s: {"unet": s, "step": torch.tensor(3)},
    lambda s: {f"module.{k}": v for k, v in s.items()},
    lambda s: {"state_dict": {f"unet.{k}": v for k, v in s.items()}},
    lambda s: {"model": {"state_dict": s}},
], ids=["plain", "state_dict", "unet-with-extras", "module-prefix", "wrapped-unet-prefix", "wrapped-twice"])
def test_pt_checkpoints_in_every_accepted_layout(tmp_path, erased_state, wrap):
    path = tmp_path / "ReCARE-Diffusers-UNet.pt"
    torch.save(wrap(erased_state), path)
    _assert_same_state(models.read_unet_state_dict(path), erased_state)


def test_safetensors_folder_run_dir_and_cache_name(tmp_path, erased_state, tiny_pipe, cache_dir):
    from safetensors.torch import save_file

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    save_file(erased_state, str(run_dir / models.UNET_FILE))
    unet_folder = tmp_path / "unet-folder"
    unet = type(tiny_pipe.unet).from_config(tiny_pipe.unet.config)
    unet.load_state_dict(erased_state)
    unet.save_pretrained(unet_folder)
    cache.register_erased(cache.cache_root(tmp_path / "cache"), "my-erased", run_dir, {"concept": "cat"})

    assert models.resolve_unet(str(run_dir)) == run_dir / models.UNET_FILE
    assert models.resolve_unet("my-erased", tmp_path / "cache") == run_dir / models.UNET_FILE
    for source in (run_dir / models.UNET_FILE, unet_folder):
        _assert_same_state(models.read_unet_state_dict(source), erased_state)


def test_unknown_unet_name(tmp_path):
    with pytest.raises(UsageError, match="no erased model of that name"):
        models.resolve_unet("never-registered", tmp_path)


def test_pickles_are_loaded_weights_only(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": _RunsCode(str(marker))}, path)
    with pytest.raises(RecareError, match="not a plain tensor file.*never unpickles") as refused:
        models.read_unet_state_dict(path)
    assert "weights_only" not in str(refused.value)
    assert not marker.exists()


class _RunsCode:
    """Unpickling this object would create a file: what a hostile checkpoint could do."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_file_without_a_state_dict(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(RecareError, match="does not hold a UNet state dict"):
        models.read_unet_state_dict(path)


def test_foreign_architecture_names_mismatched_keys(tiny_pipe, foreign_unet_file):
    state = models.read_unet_state_dict(foreign_unet_file)
    with pytest.raises(RecareError, match="does not fit this model's UNet") as err:
        models.apply_unet_weights(tiny_pipe.unet, state, "foreign.safetensors")
    message = err.value.message
    assert "missing" in message and "shape mismatch" in message
    assert "missing (e.g. down_blocks." in message
    assert "(64,) vs (32,)" in message  # the foreign block is twice as wide


def test_weights_with_keys_this_unet_lacks_are_refused_by_name(tiny_pipe):
    state = {**tiny_pipe.unet.state_dict(), "extra_block.weight": torch.zeros(2)}
    with pytest.raises(RecareError, match=r"does not fit this model's UNet: 1 unexpected \(e.g. extra_block.weight\)"):
        models.apply_unet_weights(tiny_pipe.unet, state, "extra.safetensors")


def test_runtime_loads_unet_weights_onto_the_base_model(tmp_path, erased_state):
    path = tmp_path / "erased.pt"
    torch.save(erased_state, path)
    pipe, ref, unet_path = models.Runtime("tiny-random", device="cpu").pipeline(unet=str(path), scheduler="ddim")
    assert (ref.kind, unet_path) == ("builtin", path)
    _assert_same_state(pipe.unet.state_dict(), erased_state)
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"


def test_a_run_directory_brings_its_learned_tokens_and_loose_weights_do_not(tmp_path, erased_state):
    from recare_cli.fsutil import write_safetensors
    from recare_cli.learned_tokens import write_learned_tokens

    row = torch.linspace(-1, 1, 32)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    write_safetensors(run_dir / models.UNET_FILE, erased_state)
    write_learned_tokens(run_dir / models.TOKENS_FILE, {"<adv-0>": [row]})
    pipe, _, _ = models.Runtime("tiny-random", device="cpu").pipeline(unet=str(run_dir))
    token_id = pipe.tokenizer.convert_tokens_to_ids("<adv-0>")
    assert token_id != pipe.tokenizer.unk_token_id
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[token_id], row)
    # The same weights under another name are weights only: a tokens file beside them is not theirs.
    loose = tmp_path / "run" / "erased.safetensors"
    write_safetensors(loose, erased_state)
    pipe, _, _ = models.Runtime("tiny-random", device="cpu").pipeline(unet=str(loose))
    assert "<adv-0>" not in pipe.tokenizer.get_vocab()


def test_cli_reference_pt_changes_the_images(tmp_path, erased_state, tiny_pipe, run_cli):
    from PIL import Image
    import numpy as np

    erased = tmp_path / "ReCARE-Diffusers-UNet.pt"
    torch.save(erased_state, erased)
    original = tmp_path / "original.pt"
    torch.save(tiny_pipe.unet.state_dict(), original)

    def pixels(out: Path, *unet: str):
        result = run_cli("generate", "--prompt", "a cat", *TINY_ARGS, "--output-dir", out, "--quiet", *unet)
        assert result.exit_code == 0, result.stderr
        return np.asarray(Image.open(out / "a_cat_0.png"))

    base = pixels(tmp_path / "base")
    assert np.array_equal(pixels(tmp_path / "same", "--unet", str(original)), base)
    assert not np.array_equal(pixels(tmp_path / "erased", "--unet", str(erased)), base)
    manifest = json.loads((tmp_path / "erased" / "manifest.jsonl").read_text())
    assert manifest["unet"] == str(erased)


def test_cli_unet_for_another_architecture(tmp_path, foreign_unet_file, run_cli):
    out = tmp_path / "images"
    result = run_cli("generate", "--prompt", "a cat", *TINY_ARGS, "--unet", foreign_unet_file, "--output-dir", out)
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: --unet ")
    assert "does not fit this model's UNet" in result.stderr
    assert len(result.stderr.splitlines()) == 1
    assert not out.exists()


def test_library_versions_name_the_stack():
    import diffusers

    from recare_cli import __version__

    versions = models.library_versions()
    assert versions["diffusers"] == diffusers.__version__
    assert versions["recare"] == __version__
    assert {"python", "torch", "transformers", "accelerate"} <= versions.keys()


# CPU memory ---------------------------------------------------------------------------------------

KEEP_FREED_MEMORY_SCRIPT = """
import json, resource, sys
from pathlib import Path
import torch
from recare_cli.models import Runtime, load_pipeline, resolve_model

def faults_per_encode(vae, calls=3):
    pixels = torch.zeros(1, 3, 512, 512)
    with torch.no_grad():
        vae.encode(pixels)  # the first call's faults are the heap growing: not counted
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(calls):
            vae.encode(pixels)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / calls

cache = Path(sys.argv[1])
vae = load_pipeline(resolve_model("tiny-random", cache, offline=True), offline=True).vae
plain = faults_per_encode(vae)
Runtime("tiny-random", device="cpu", offline=True, cache_dir=cache).pipeline()
print(json.dumps({"plain": plain, "tuned": faults_per_encode(vae)}))
"""


def glibc_here() -> bool:
    # Asked of the C library itself, not through recare's check: a broken check must fail these
    # tests, not skip them.
    try:
        return sys.platform.startswith("linux") and (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    except (ValueError, OSError):
        return False


def test_glibc_malloc_is_detected_exactly_where_the_c_library_is_glibc():
    assert has_glibc_malloc() == glibc_here()


@pytest.mark.skipif(not glibc_here(), reason="glibc's allocator")
@pytest.mark.parametrize("opt_out", [None, "0"])
def test_cpu_pipeline_makes_freed_tensor_memory_reusable(tiny_model, cache_dir, opt_out):
    # The setting is process-wide, so a process of its own measures before and after it.
    env = {k: v for k, v in os.environ.items() if k != "RECARE_KEEP_FREED_MEMORY"}
    if opt_out is not None:
        env["RECARE_KEEP_FREED_MEMORY"] = opt_out
    done = subprocess.run([sys.executable, "-c", KEEP_FREED_MEMORY_SCRIPT, str(cache_dir)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    faults = json.loads(done.stdout.strip().splitlines()[-1])
    # By default glibc maps each 32 MiB activation of a 512 px VAE pass afresh and unmaps it when
    # freed, so every encode faults its pages in again ...
    assert faults["plain"] > 10_000
    if opt_out is None:
        # ... after a CPU pipeline's load the heap keeps freed blocks, and the next encode reuses them.
        assert faults["tuned"] * 10 <= faults["plain"]
    else:  # ... unless the user said no: glibc's defaults stay, and so do the faults
        assert faults["tuned"] * 2 > faults["plain"]
