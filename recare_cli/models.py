"""Resolving `--model` / `--unet` and loading pipelines: the one module every command uses.

Nothing heavy is imported at module level: the CLI imports this module at start-up.

`--model` is a Hugging Face repo id (through the standard HF cache), a local diffusers folder, a
single-file checkpoint, or a built-in name (`tiny-random`). Built-ins are written once into
recare's cache and then loaded exactly like a diffusers folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from recare_cli import cache
from recare_cli.errors import ModelNotAvailable, RecareError, UsageError
from recare_cli.output import quiet_libraries

DEFAULT_MODEL = "CompVis/stable-diffusion-v1-4"
TOKENS_FILE = "tokens.safetensors"  # an erase run's learned tokens, next to its unet.safetensors
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
SINGLE_FILE_UNET_PREFIX = "model.diffusion_model."  # the UNet's keys in every SD single-file checkpoint
# What a pipeline needs from a hub repo; SD repos also hold multi-GB .ckpt files we never want.
HUB_PATTERNS = ["model_index.json", "*/*.json", "*/*.txt", "*/*.safetensors"]


@dataclass(frozen=True)
class ModelRef:
    spec: str  # what the user typed
    kind: str  # builtin | hub | folder | single-file
    path: Path
    revision: str | None = None

    def describe(self) -> dict:
        return {"model": self.spec, "kind": self.kind, "path": str(self.path), "revision": self.revision}


# built-in models ---------------------------------------------------------------------------------

def _package_config(name: str) -> dict:
    return json.loads((Path(__file__).parent / "data" / f"{name}.json").read_text())


def build_tiny_random(folder: Path, config_name: str = "tiny-random") -> None:
    """Write an SD-1.x/2.x-shaped random-weight pipeline from its package config to `folder`.

    `tiny-random` is shared/spec/tiny-random.md's SD 1.x shape; `tiny-random-v` the SD 2.x 768 one.
    """
    import diffusers
    from diffusers import StableDiffusionPipeline

    from recare_cli.clipvocab import build_tokenizer

    quiet_libraries()
    config = _package_config(config_name)
    unet, vae, text_encoder = _seeded_parts(config)
    with tempfile.TemporaryDirectory() as tokenizer_src:
        tokenizer = build_tokenizer(Path(tokenizer_src), **config["tokenizer"])
    scheduler_class = getattr(diffusers, config.get("scheduler_class", "PNDMScheduler"))
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=scheduler_class.from_config(config["scheduler"]),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)


def _seeded_parts(config: dict):
    """The UNet, VAE and (first) text encoder of a built-in random model, each from its own seed."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(config["seed"])
    unet = UNet2DConditionModel(**config["unet"])
    torch.manual_seed(config["seed"] + 1)
    vae = AutoencoderKL(**config["vae"])
    torch.manual_seed(config["seed"] + 2)
    return unet, vae, CLIPTextModel(CLIPTextConfig(**config["text_encoder"]))


def build_tiny_random_xl(folder: Path) -> None:
    """Write the SDXL-shaped random-weight pipeline (data/tiny-random-xl.json) to `folder`."""
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from recare_cli.clipvocab import build_tokenizer

    quiet_libraries()
    config = _package_config("tiny-random-xl")
    unet, vae, text_encoder = _seeded_parts(config)
    torch.manual_seed(config["seed"] + 3)
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**config["text_encoder_2"]))
    with tempfile.TemporaryDirectory() as tokenizer_src:
        tokenizer = build_tokenizer(Path(tokenizer_src), **config["tokenizer"])
        tokenizer_2 = build_tokenizer(Path(tokenizer_src), **config["tokenizer_2"])
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=EulerDiscreteScheduler.from_config(config["scheduler"]),
        add_watermarker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)


def build_toy(folder: Path) -> None:
    """Write the trained toy model shipped in recare_cli/data/toy/ (recare_cli/toy/)."""
    from recare_cli.toy.package import build_pipeline

    quiet_libraries()
    build_pipeline(folder)


TOY_FILES = ("toy/toy.json", "toy/toy.safetensors")  # under recare_cli/data/; also the toy CLIP's source

# name -> (builder, package data files whose hash decides when a cached copy is stale)
BUILTIN_MODELS: dict[str, tuple[Callable[[Path], None], tuple[str, ...]]] = {
    "tiny-random": (build_tiny_random, ("tiny-random.json",)),
    "tiny-random-v": (lambda folder: build_tiny_random(folder, "tiny-random-v"), ("tiny-random-v.json",)),
    "tiny-random-xl": (build_tiny_random_xl, ("tiny-random-xl.json",)),
    "toy": (build_toy, TOY_FILES),
}


def builtin_digest(files: tuple[str, ...]) -> str:
    digest = hashlib.sha256()
    for name in files:
        path = Path(__file__).parent / "data" / name
        if not path.is_file():
            raise RecareError(f"the built-in model's file {path} is missing from this installation",
                              hint="reinstall recare")
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def builtin_path(name: str, cache_dir: Path | None = None) -> Path:
    """The built-in model's folder in recare's cache, building it on first use."""
    builder, files = BUILTIN_MODELS[name]
    return cache.built_entry(cache.cache_root(cache_dir), "models", name, builtin_digest(files), builder)


# resolution -----------------------------------------------------------------------------------

def hub_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return Path(home) / "hub"


def is_offline(offline: bool) -> bool:
    return offline or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def resolve_model(spec: str, cache_dir: Path | None = None, offline: bool = False) -> ModelRef:
    if spec in BUILTIN_MODELS:
        return ModelRef(spec, "builtin", builtin_path(spec, cache_dir))
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise RecareError(
                f"'{spec}' is not a diffusers pipeline folder (no model_index.json)",
                hint="pass a folder saved with save_pretrained, a .safetensors/.ckpt file, a hub id or a built-in name",
            )
        return ModelRef(spec, "folder", path)
    if path.is_file():
        if path.suffix not in SINGLE_FILE_SUFFIXES:
            raise RecareError(
                f"'{spec}' is not a model: a single-file checkpoint must end in .safetensors or .ckpt",
            )
        if path.suffix == ".safetensors":
            _check_safetensors(path, spec)
        else:
            _check_ckpt(path, spec)
        return ModelRef(spec, "single-file", path)
    if HUB_ID.match(spec) and not spec.startswith((".", "/", "~")):
        return _resolve_hub(spec, offline)
    builtins = ", ".join(BUILTIN_MODELS)
    raise ModelNotAvailable(
        f"model '{spec}' not found: no such folder or file, and not a hub id or built-in",
        hint=f"built-ins: {builtins}",
    )


def _check_safetensors(path: Path, spec: str, whole_model: bool = True) -> None:
    """Reading the header is cheap; without it a corrupt file fails later as "config not available".

    `whole_model`: a --model single file, which must hold the LDM UNet keys (UNet weights for --unet need not).
    """
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = list(handle.keys())
        if not keys:
            raise RecareError(f"'{spec}' is an empty safetensors file, not a model")
        if whole_model and not any(key.startswith(SINGLE_FILE_UNET_PREFIX) for key in keys):
            raise RecareError(f"'{spec}' is not a Stable Diffusion checkpoint (no {SINGLE_FILE_UNET_PREFIX}* weights)",
                              hint="erased UNet weights go to --unet; --model takes a whole pipeline")
    except RecareError:
        raise
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for bad headers
        raise RecareError(
            f"'{spec}' is not a readable safetensors checkpoint: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
        ) from None


def _check_ckpt(path: Path, spec: str) -> None:
    """A .ckpt must hold tensors only; anything else is a bad file (exit 1), not a missing model.

    Loaded with weights_only=True (no code runs, whatever the file's pickle says) and memory-mapped,
    so a multi-GB checkpoint costs little here. torch's own message is not shown: it suggests
    loading with code execution, the unsafe way round.
    """
    try:
        state = torch_load_tensors(path, f"'{spec}'", mmap=True)
    except Exception as exc:  # noqa: BLE001 - a damaged archive, a bare pickle, a refused object: all unreadable
        raise RecareError(f"'{spec}' is unreadable: not a PyTorch checkpoint of tensors ({type(exc).__name__})",
                          hint="the file is damaged, or holds objects other than tensors (refused: loading them "
                               "could run code)") from None
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not any(str(key).startswith(SINGLE_FILE_UNET_PREFIX) for key in state):
        raise RecareError(f"'{spec}' is not a Stable Diffusion checkpoint (no {SINGLE_FILE_UNET_PREFIX}* weights)",
                          hint="erased UNet weights go to --unet; --model takes a whole pipeline")


def _resolve_hub(repo_id: str, offline: bool) -> ModelRef:
    from huggingface_hub import snapshot_download

    hub_cache = hub_cache_dir()
    try:
        folder = snapshot_download(repo_id, cache_dir=hub_cache, local_files_only=True)
    except Exception:  # noqa: BLE001 - any failure here just means "not cached"
        if is_offline(offline):
            raise ModelNotAvailable(
                f"model '{repo_id}' is not in the local Hugging Face cache ({hub_cache}) and offline mode is on",
                hint=f"download it once online (`hf download {repo_id}`) or pass a local folder",
            ) from None
        try:
            folder = snapshot_download(repo_id, cache_dir=hub_cache, allow_patterns=HUB_PATTERNS)
        except Exception as exc:  # noqa: BLE001 - network, auth, missing repo: all mean unavailable
            raise ModelNotAvailable(
                f"model '{repo_id}' could not be downloaded: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                hint="check the id and your network, or pass a local folder with --model",
            ) from None
    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        raise RecareError(f"hub model '{repo_id}' in {folder} is not a diffusers pipeline (no model_index.json)")
    return ModelRef(repo_id, "hub", folder, revision=folder.name)


# devices and dtypes ------------------------------------------------------------------------------

DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "fp32", "fp16", "bf16")


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if device.startswith("cuda"):
        if not re.fullmatch(r"cuda(:\d+)?", device):
            raise UsageError(f"--device '{device}' is not a device", hint="use auto, cpu, cuda, cuda:N or mps")
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device} asked for, but CUDA is not available here", hint="use --device cpu")
        return device
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UsageError("--device mps asked for, but MPS is not available here", hint="use --device cpu")
    if device not in DEVICES:
        raise UsageError(f"--device '{device}' is not a device", hint="use auto, cpu, cuda, cuda:N or mps")
    return device


def resolve_dtype(dtype: str, device: str):
    import torch

    if dtype == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    table = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if dtype not in table:
        raise UsageError(f"--dtype '{dtype}' is not a dtype", hint="use auto, fp32, fp16 or bf16")
    return table[dtype]


# pipelines ----------------------------------------------------------------------------------

SDXL_PIPELINE = "StableDiffusionXLPipeline"
SDXL_SINGLE_FILE_KEY = "conditioner.embedders.1."  # SDXL's second text encoder, in its original layout


def pipeline_class_name(ref: ModelRef) -> str:
    """StableDiffusionPipeline or StableDiffusionXLPipeline, read from the model's own files, never its name.

    A folder says so in model_index.json's `_class_name`; a single file by its keys: only SDXL's
    original layout has a second text encoder under `conditioner.embedders.1`.
    """
    if ref.kind != "single-file":
        index = json.loads((ref.path / "model_index.json").read_text(encoding="utf-8"))
        return SDXL_PIPELINE if "XL" in str(index.get("_class_name", "")) else "StableDiffusionPipeline"
    if ref.path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(ref.path), framework="pt") as handle:
            keys = handle.keys()
    else:
        state = torch_load_tensors(ref.path, f"'{ref.path}'", map_location="meta")
        keys = (state.get("state_dict", state) if isinstance(state, dict) else {}).keys()
    return SDXL_PIPELINE if any(k.startswith(SDXL_SINGLE_FILE_KEY) for k in keys) else "StableDiffusionPipeline"


def is_sdxl(pipe) -> bool:
    return getattr(pipe, "text_encoder_2", None) is not None


def load_pipeline(ref: ModelRef, *, torch_dtype=None, offline: bool = False, single_file_config: str | None = None):
    """A StableDiffusionPipeline or StableDiffusionXLPipeline (no safety checker) from a resolved model, on the CPU."""
    import diffusers

    pipeline_class = getattr(diffusers, pipeline_class_name(ref))
    if pipeline_class.__name__ == SDXL_PIPELINE:
        kwargs = dict(torch_dtype=torch_dtype, add_watermarker=False)  # SDXL has no safety checker
    else:
        kwargs = dict(torch_dtype=torch_dtype, safety_checker=None, requires_safety_checker=False)
    try:
        if ref.kind == "single-file":
            # The base model's configs come from the same HF cache that hub ids resolve through.
            return pipeline_class.from_single_file(
                str(ref.path), local_files_only=is_offline(offline), config=single_file_config,
                cache_dir=hub_cache_dir(), **kwargs
            )
        return pipeline_class.from_pretrained(str(ref.path), local_files_only=True, **kwargs)
    except RecareError:
        raise
    except (OSError, ValueError, KeyError, EnvironmentError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        error = ModelNotAvailable if ref.kind == "single-file" else RecareError
        raise error(
            f"could not load model '{ref.spec}': {first_line}",
            hint="offline, a single file needs its base model's configs in the Hugging Face cache "
                 "(`hf download REPO --include '*.json' '*.txt'` once online)"
            if ref.kind == "single-file" else "is the folder a complete diffusers pipeline?",
        ) from exc


# erased UNet weights (--unet) ----------------------------------------------------------------

UNET_FILE = "unet.safetensors"  # what `recare erase` writes into its run directory
_WRAPPER_KEYS = ("state_dict", "unet", "model")
_KEY_PREFIXES = ("module.", "unet.")


UNET_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")


def resolve_unet(spec: str, cache_dir: Path | None = None) -> Path:
    """A path to UNet weights: an existing file or folder, or the name of an erased model in the cache.

    Cheap checks only (the path, its suffix, a safetensors header), so a bad --unet fails before any model loads.
    """
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_dir():
            if (path / UNET_FILE).is_file():
                return path / UNET_FILE  # a run directory
            if not (path / "config.json").is_file():
                raise UsageError(f"--unet '{spec}' is a folder without {UNET_FILE} or a UNet config.json",
                                 hint="pass a run directory, a UNet folder, or a .safetensors/.pt file")
            return path
        if path.suffix.lower() not in UNET_SUFFIXES:
            raise UsageError(f"--unet '{spec}' is not a weights file (expected {', '.join(UNET_SUFFIXES)})",
                             hint="pass a run directory, a UNet folder, or a .safetensors/.pt file")
        if path.suffix.lower() == ".safetensors":
            _check_safetensors(path, spec, whole_model=False)
        return path
    run_dir = cache.lookup_erased(cache.cache_root(cache_dir), spec)
    if run_dir is not None and (run_dir / UNET_FILE).is_file():
        return run_dir / UNET_FILE
    raise UsageError(
        f"--unet '{spec}': no such file or folder, and no erased model of that name in the cache",
        hint="see `recare cache` for registered names",
    )


def torch_load_tensors(path: Path, described: str, map_location: str = "cpu", mmap: bool = False):
    """torch.load restricted to tensors and plain containers: recare never unpickles code.

    torch's own message for a refused pickle suggests the unsafe fix (loading with code execution): never shown.
    """
    import pickle
    import warnings

    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on pickle protocols: the user cannot act on them
            return torch.load(str(path), map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        if "weights only load failed" not in str(exc).lower():
            raise  # not a pickle at all: the caller says the file is unreadable
        raise RecareError(
            f"{described} is not a plain tensor file: it holds pickled Python objects, and recare never unpickles code",
            hint="save the weights as a state dict of tensors, or as .safetensors",
        ) from None


def non_finite(tensors: dict) -> list[str]:
    """Names of the floating-point tensors holding NaN or ±inf."""
    import torch

    return [name for name, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def read_unet_state_dict(path: Path) -> dict:
    import torch

    path = Path(path)
    try:
        if path.is_dir():
            from diffusers import UNet2DConditionModel

            return UNet2DConditionModel.from_pretrained(path).state_dict()
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch_load_tensors(path, f"'{path}'")
    except RecareError:
        raise
    except Exception as exc:  # noqa: BLE001 - unreadable weights are a user error, whatever the reason
        raise RecareError(f"cannot read UNet weights from '{path}': {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    while isinstance(state, dict) and len(state) == 1 and next(iter(state)) in _WRAPPER_KEYS:
        state = next(iter(state.values()))
    for key in _WRAPPER_KEYS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise RecareError(f"'{path}' does not hold a UNet state dict (name → tensor)")
    for prefix in _KEY_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    bad = non_finite(state)
    if bad:
        raise RecareError(
            f"the UNet weights in '{path}' are not finite: {len(bad)} of {len(state)} tensors hold NaN or inf "
            f"(e.g. {bad[0]})",
            hint="they come from a training run that diverged; erase again with a lower learning rate",
        )
    return state


def apply_unet_weights(unet, state: dict, source: str, argument: str = "--unet") -> None:
    """Load `state` into `unet`, or fail naming a few mismatched keys (`argument` names where `source` came from)."""
    expected = unet.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items() if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong_shape)):
        if items:
            problems.append(f"{len(items)} {label} (e.g. {', '.join(items[:3])})")
    if problems:
        raise RecareError(
            f"{argument} '{source}' does not fit this model's UNet: {'; '.join(problems)}",
            hint="was it trained from a different base model? pass that one with --model",
        )
    unet.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()})


def load_unet_into(pipe, spec: str, path: Path, state: dict) -> None:
    """Load erased UNet weights (`state`, read from `path`); from an erase run, also its learned tokens."""
    apply_unet_weights(pipe.unet, state, spec)
    from recare_cli.learned_tokens import add_learned_tokens

    tokens = path.parent / TOKENS_FILE
    if path.name == UNET_FILE and tokens.is_file():
        add_learned_tokens(pipe, tokens)


# schedulers -----------------------------------------------------------------------------------

SCHEDULERS = {
    "pndm": "PNDMScheduler",
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler",
    "lms": "LMSDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
}


def check_scheduler(name: str | None) -> None:
    if name is not None and name not in SCHEDULERS:
        raise UsageError(f"unknown scheduler '{name}'", hint=f"choose one of {', '.join(SCHEDULERS)}")


def set_scheduler(pipe, name: str | None) -> None:
    check_scheduler(name)
    if name is None:
        return
    import diffusers

    pipe.scheduler = getattr(diffusers, SCHEDULERS[name]).from_config(pipe.scheduler.config)


# runtime: the common options, as the core sees them ---------------------------------------

@dataclass
class Runtime:
    model: str = DEFAULT_MODEL
    device: str = "auto"
    dtype: str = "auto"
    offline: bool = False
    cache_dir: Path | None = None

    def torch_device(self) -> str:
        return resolve_device(self.device)

    def torch_dtype(self):
        return resolve_dtype(self.dtype, self.torch_device())

    def resolve(self) -> ModelRef:
        return resolve_model(self.model, self.cache_dir, self.offline)

    def pipeline(self, unet: str | None = None, scheduler: str | None = None, device: str | None = None,
                 embeddings=()):
        """(pipeline on the device, ModelRef, path of the --unet weights or None).

        `embeddings`: learned-token files (`--embeddings`) whose tokens the text encoder(s) get.
        """
        from recare_cli.learned_tokens import add_embeddings_files, check_embeddings_files

        quiet_libraries()
        check_scheduler(scheduler)
        device = device or self.torch_device()
        dtype = resolve_dtype(self.dtype, device)
        ref = self.resolve()
        # A bad --unet (missing, pickled code, not finite) or --embeddings file fails before the model's load.
        unet_path = resolve_unet(unet, self.cache_dir) if unet else None
        unet_state = read_unet_state_dict(unet_path) if unet else None
        token_files = check_embeddings_files(embeddings, ref)
        pipe = load_pipeline(ref, torch_dtype=dtype, offline=self.offline)
        if unet:
            load_unet_into(pipe, unet, unet_path, unet_state)
        add_embeddings_files(pipe, token_files)
        set_scheduler(pipe, scheduler)
        pipe.set_progress_bar_config(disable=True)
        return pipe.to(device), ref, unet_path


def library_versions() -> dict:
    import platform
    from importlib.metadata import PackageNotFoundError, version

    from recare_cli import __version__

    found = {"recare": __version__, "python": platform.python_version()}
    for name in ("torch", "diffusers", "transformers", "open_clip_torch", "accelerate", "safetensors"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found
