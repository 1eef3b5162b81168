"""Devices, dtypes, schedulers and pipeline loading, and `Runtime`: the common options as the core sees them."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from recare_cli.errors import ModelNotAvailable, RecareError, UsageError
from recare_cli.models.files import torch_load_tensors
from recare_cli.models.resolve import DEFAULT_MODEL, ModelRef, hub_cache_dir, is_offline, resolve_model
from recare_cli.models.unet import load_unet_into, read_unet_state_dict, resolve_unet
from recare_cli.output import quiet_libraries

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
        if device == "cpu":
            keep_freed_memory()
        return pipe.to(device), ref, unet_path


# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
KEPT_FREE_BYTES = 1 << 30
KEEP_FREED_MEMORY_VARIABLE = "RECARE_KEEP_FREED_MEMORY"


def has_glibc_malloc() -> bool:
    import platform

    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def keep_freed_memory() -> bool:
    """Let this process reuse the memory of freed CPU tensors instead of handing it back (glibc only).

    glibc serves each allocation over 32 MiB with an mmap of its own and unmaps it on free, so
    every such tensor page-faults all its pages in anew: a 512 px VAE pass is made of them (32
    channels of 512x512 floats is 32 MiB), and the faults were half of a `tiny-random` VAE encode's
    time on a CPU (bench/cpu_memory.py). Without those mmaps, and with up to KEPT_FREE_BYTES of freed
    heap kept, the next activation reuses the last one's pages. The price: a process keeps up to
    1 GiB it no longer uses until it exits, and the allocator setting is the whole process's:
    RECARE_KEEP_FREED_MEMORY=0 leaves glibc's defaults alone (a program that embeds recare and
    minds its memory). Returns whether the setting took.
    """
    import ctypes
    import os

    if os.environ.get(KEEP_FREED_MEMORY_VARIABLE, "1").strip() == "0" or not has_glibc_malloc():
        return False
    libc = ctypes.CDLL(None)
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, KEPT_FREE_BYTES))


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
