"""Exporting an erased model in the formats other tools load, each one loaded back and checked.

Formats: a full diffusers pipeline folder, the UNet alone (diffusers keys), one original-layout
(LDM) Stable Diffusion checkpoint for AUTOMATIC1111 / ComfyUI, a LoRA of the weight difference,
and the learned adversarial tokens as textual-inversion embeddings.

Every export is written into a staging path next to the output, loaded back with the loader its
users will use, and compared with the source before it takes the output's name: a UNet forward on
a fixed input (the *probe*) must agree within the dtype's tolerance, and weights that are merely
re-keyed (VAE, text encoder, tokens) must come back bit for bit. A failed check leaves nothing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator

from recare_cli import __version__
from recare_cli.cache import cache_root, lookup_erased
from recare_cli.errors import RecareError, UsageError
from recare_cli.fsutil import ensure_writable_dir, give_umask_mode, removing_new_dirs
from recare_cli.manifest import RUN_RECORD as MANIFEST
from recare_cli.manifest import Writer, claim
from recare_cli.numbers import check
from recare_cli.models import (
    TOKENS_FILE, UNET_FILE, ModelRef, Runtime, apply_unet_weights, is_sdxl, read_unet_state_dict,
)
from recare_cli.output import QUIET_REPORTER, Reporter

FORMATS = ("diffusers", "unet", "single-file", "lora", "tokens")
FILE_SUFFIX = ".safetensors"
EXPORT = Writer("export")
MODEL_CARD = "README.md"
DEFAULT_RANK = 32
CHECK_FAILED_HINT = "rerun with --verbose; if it persists, report it with `recare --version`"

# Largest max |difference| allowed between the probe of an export and of its source (a noise
# prediction of unit scale). An fp32 export holds the source's exact values, so only kernel choice
# differs (PEFT adds B(A(x)) as its own matmul; measured up to 4e-6): 1e-4 is far above that and far
# below what one misplaced weight does (O(1)). Rounding weights to fp16 (11-bit mantissa) or bf16
# (8-bit) moved tiny-random's probe by 2.2e-3 and 1.6e-2; a deep SD UNet compounds rounding over
# more layers, so the tolerances leave about twenty times that.
TOLERANCE = {"fp32": 1e-4, "fp16": 5e-2, "bf16": 2.5e-1}
PROBE_SEED = 0
PROBE_TIMESTEP = 500
PROBE_TOKENS = 77
PROBE_MAX_SIZE = 32  # latent side: small keeps a real SD UNet's check cheap, still divisible by 8


# the source -----------------------------------------------------------------------------------

@dataclass
class ExportSource:
    spec: str  # as typed
    unet_path: Path
    run_dir: Path | None = None
    tokens_path: Path | None = None
    base_model: str | None = None  # from the run manifest or the weights' metadata
    method: str | None = None
    concepts: list[str] = field(default_factory=list)
    unet_state: dict | None = field(default=None, repr=False)  # read by `export` before the base model loads


def resolve_source(spec: str, cache_dir: Path | None = None) -> ExportSource:
    """A run directory, the cache name of one, a UNet weights file, or a diffusers UNet folder."""
    path = Path(spec).expanduser()
    if not path.exists():
        run_dir = lookup_erased(cache_root(cache_dir), spec)
        if run_dir is None:
            raise UsageError(
                f"export source '{spec}': no such file or folder, and no erased model of that name in the cache",
                hint="pass a run directory, a UNet .safetensors/.pt file, or a name listed by `recare cache`",
            )
        return _run_source(spec, run_dir)
    if path.is_dir() and ((path / MANIFEST).is_file() or (path / UNET_FILE).is_file()):
        return _run_source(spec, path)
    if path.is_dir() and not (path / "config.json").is_file():
        raise RecareError(
            f"export source '{spec}' holds no weights: neither a run directory ({UNET_FILE}) nor a UNet folder",
            hint="pass the folder `recare erase` wrote, or a UNet weights file",
        )
    metadata = _safetensors_metadata(path) if path.suffix == FILE_SUFFIX else {}
    return ExportSource(
        spec=spec, unet_path=path, base_model=metadata.get("base_model") or None,
        method=metadata.get("method") or None, concepts=_split_concepts(metadata.get("concept", "")),
    )


def _run_source(spec: str, run_dir: Path) -> ExportSource:
    unet_path = run_dir / UNET_FILE
    if not unet_path.is_file():
        raise RecareError(
            f"run directory '{run_dir}' has no {UNET_FILE}: the run has not finished",
            hint="finish it with `recare erase` (a rerun continues), or export another run",
        )
    manifest = {}
    if (run_dir / MANIFEST).is_file():
        try:
            manifest = json.loads((run_dir / MANIFEST).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise RecareError(f"cannot read {run_dir / MANIFEST}: {exc}") from None
    metadata = _safetensors_metadata(unet_path)
    concepts = manifest.get("concepts") or _split_concepts(metadata.get("concept", ""))
    base_model = manifest.get("model")
    if isinstance(base_model, dict):  # `recare erase` records the resolved ModelRef; its spec is what was typed
        base_model = base_model.get("model")
    tokens_path = run_dir / TOKENS_FILE
    return ExportSource(
        spec=spec, unet_path=unet_path, run_dir=run_dir,
        tokens_path=tokens_path if tokens_path.is_file() else None,
        base_model=base_model or metadata.get("base_model") or None,
        method=manifest.get("method") or metadata.get("method") or None,
        concepts=[str(c) for c in concepts],
    )


def _split_concepts(text: str) -> list[str]:
    return [c.strip() for c in text.split(",") if c.strip()]


def _safetensors_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except Exception as exc:  # noqa: BLE001 - a corrupt or foreign file is a user error, whatever the cause
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise RecareError(f"'{path}' is not a readable safetensors file: {reason}") from None


def base_model_for(source: ExportSource, explicit_model: str | None, default_model: str) -> str:
    """--model when given on the command line, else the base the run recorded, else the default."""
    return explicit_model or source.base_model or default_model


# settings and result --------------------------------------------------------------------------

@dataclass
class ExportSettings:
    format: str
    output: Path
    dtype: str = "fp32"  # fp32 | fp16 | bf16: the precision the export stores
    rank: int = DEFAULT_RANK
    overwrite: bool = False
    safety_checker: bool = True  # a diffusers export keeps the base pipeline's safety checker


@dataclass
class ExportResult:
    format: str
    output: str
    base_model: str
    dtype: str
    max_abs_diff: float  # what the check compared (see `checked_against`)
    tolerance: float
    checked_against: str
    files: list[str] = field(default_factory=list)
    details: dict = field(default_factory=dict)


def check_settings(settings: ExportSettings) -> None:
    """Everything about the output that can be refused before any model is loaded."""
    if settings.format not in FORMATS:
        raise UsageError(f"unknown export format '{settings.format}'", hint=f"choose one of {', '.join(FORMATS)}")
    if settings.dtype not in TOLERANCE:
        raise UsageError(f"cannot export in '{settings.dtype}'", hint="use --dtype fp32, fp16 or bf16")
    check("rank", settings.rank)
    output = Path(settings.output)
    wants_file = output.suffix == FILE_SUFFIX
    if settings.format == "diffusers" and wants_file:
        raise UsageError(f"--format diffusers writes a folder, not '{output}'", hint="drop the .safetensors suffix")
    if settings.format in ("unet", "single-file", "lora") and not wants_file:
        raise UsageError(f"--format {settings.format} writes one file: --output must end in {FILE_SUFFIX}")
    if output.is_dir():
        claim(output, EXPORT, flag="--output")  # --overwrite must not replace another command's folder
    elif output.exists():
        claim(output.parent, EXPORT, flag="--output")
    if output.exists() or output.is_symlink():
        if not settings.overwrite:
            raise UsageError(f"'{output}' already exists",
                             hint="pass --overwrite to replace it, or choose another --output")
        if output.is_dir() == wants_file:
            kind = "folder" if output.is_dir() else "file"
            raise UsageError(f"'{output}' is a {kind}; this export would replace it with a "
                             f"{'file' if wants_file else 'folder'}", hint="choose another --output")
    ensure_writable_dir(output.parent, "--output")


@contextmanager
def staged_output(output: Path) -> Iterator[Path]:
    """A path with the output's own name in a private folder next to it; it replaces `output` on success.

    Loaders tell a checkpoint's format from its file name, so the staged copy keeps the real name
    (fsutil.atomic_path's temporary names end in .tmp) and can be loaded back before it is moved.
    """
    output = Path(output)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent))
    try:
        staged = staging / output.name
        yield staged
        give_umask_mode(staged)
        if output.is_dir() and not output.is_symlink():
            shutil.rmtree(output)
        os.replace(staged, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# the export ---------------------------------------------------------------------------------

def export(source: ExportSource, settings: ExportSettings, runtime: Runtime,
           reporter: Reporter = QUIET_REPORTER) -> ExportResult:
    """Write `source` in `settings.format`, check it loads back to the same model, then publish it."""
    with removing_new_dirs(Path(settings.output).parent):
        check_settings(settings)
        if settings.format == "tokens" and source.tokens_path is None:
            raise RecareError(
                f"export source '{source.spec}' has no learned tokens ({TOKENS_FILE})"
                + (f"; method '{source.method}' learns none" if source.method else ""),
                hint="tokens come from a ReCARE run directory; export the UNet with --format unet, lora, ...",
            )
        if settings.format != "tokens":  # unreadable or exploded weights fail before the base model loads
            source = replace(source, unet_state=read_unet_state_dict(source.unet_path))
        reporter.event("export_load", base_model=runtime.model, source=source.spec)
        pipe, ref, _ = runtime.pipeline()
        writer = {"diffusers": _export_diffusers, "unet": _export_unet, "single-file": _export_single_file,
                  "lora": _export_lora, "tokens": _export_tokens}[settings.format]
        with staged_output(Path(settings.output)) as staged:
            result = writer(pipe, ref, source, settings, staged, reporter)
            tolerance = TOLERANCE[settings.dtype]
            reporter.event("export_check", max_abs_diff=result.max_abs_diff, tolerance=tolerance,
                           against=result.checked_against)
            if not result.max_abs_diff <= tolerance:  # written so that NaN fails too
                raise RecareError(
                    f"export check failed: the {settings.format} export differs from {result.checked_against} "
                    f"by {result.max_abs_diff:.3g} (tolerance {tolerance:g} for {settings.dtype}); nothing was written",
                    hint=CHECK_FAILED_HINT,
                )
        result.output = str(settings.output)
        result.files = [str(Path(settings.output) / name) for name in result.files] or [str(settings.output)]
        return result


def _erased_pipeline(pipe, source: ExportSource) -> dict:
    """Put the source's UNet into `pipe` (checked against the base's shapes); return its weights."""
    apply_unet_weights(pipe.unet, source.unet_state, source.spec, argument="export source")
    return source.unet_state


def _metadata(source: ExportSource, ref: ModelRef, settings: ExportSettings, **extra) -> dict[str, str]:
    """The safetensors header every export carries (the keys `recare erase` writes, plus the export's)."""
    return {
        "format": "pt",
        "concept": ", ".join(source.concepts),
        "method": source.method or "",
        "base_model": ref.spec,
        "recare_version": __version__,
        "export_format": settings.format,
        "dtype": settings.dtype,
        **{k: str(v) for k, v in extra.items()},
    }


def _torch_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def _cast(state: dict, dtype_name: str) -> dict:
    dtype = _torch_dtype(dtype_name)
    return {k: v.detach().to("cpu", dtype).contiguous() for k, v in state.items()}


# checks -------------------------------------------------------------------------------------

def unet_probe(unet):
    """The UNet's fp32 noise prediction for a fixed latent, timestep and text: what exports are compared by."""
    import torch

    config = unet.config
    size = min(config.sample_size, PROBE_MAX_SIZE)
    generator = torch.Generator().manual_seed(PROBE_SEED)
    latents = torch.randn(1, config.in_channels, size, size, generator=generator)
    text_states = torch.randn(1, PROBE_TOKENS, config.cross_attention_dim, generator=generator)
    added_cond_kwargs = None
    if config.addition_embed_type == "text_time":  # SDXL: a pooled text embedding and size/crop time ids
        pooled_dim = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        side = 8.0 * size
        added_cond_kwargs = {"text_embeds": torch.randn(1, pooled_dim, generator=generator).to(unet.device),
                             "time_ids": torch.tensor([[side, side, 0.0, 0.0, side, side]], device=unet.device)}
    unet = unet.float()
    with torch.no_grad():
        eps = unet(latents.to(unet.device), PROBE_TIMESTEP, encoder_hidden_states=text_states.to(unet.device),
                   added_cond_kwargs=added_cond_kwargs).sample
    return eps.cpu()


def max_abs_diff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


def require_same_weights(expected: dict, loaded: dict, what: str) -> None:
    """Re-keyed weights must come back exactly: any difference means a key went to the wrong place."""
    missing = sorted(set(expected) - set(loaded))
    unexpected = sorted(set(loaded) - set(expected))
    changed = [k for k in expected if k in loaded
               and (tuple(expected[k].shape) != tuple(loaded[k].shape) or max_abs_diff(expected[k], loaded[k]) != 0)]
    if missing or unexpected or changed:
        examples = ", ".join((missing + unexpected + changed)[:3])
        raise RecareError(
            f"export check failed: the {what} did not load back as written ({len(missing)} missing, "
            f"{len(unexpected)} unexpected, {len(changed)} changed, e.g. {examples}); nothing was written",
            hint=CHECK_FAILED_HINT,
        )


def _load_kwargs(dtype_name: str, pipe, safety_checker: bool = False) -> dict:
    kwargs = dict(torch_dtype=_torch_dtype(dtype_name), local_files_only=True)
    if safety_checker or is_sdxl(pipe):  # SDXL pipelines have no safety checker to turn off
        return kwargs
    return dict(kwargs, safety_checker=None, requires_safety_checker=False)


def base_safety_checker(ref: ModelRef):
    """The base pipeline's safety checker (recare's loads leave it out), or None when it has none."""
    index_path = Path(ref.path) / "model_index.json"
    if not index_path.is_file():
        return None  # a single file or a built-in: nothing to keep
    library, class_name = (json.loads(index_path.read_text(encoding="utf-8")).get("safety_checker") or [None, None])
    if class_name is None:
        return None
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    if class_name != StableDiffusionSafetyChecker.__name__:
        raise RecareError(f"the base model's safety checker is a {library}.{class_name}, which recare cannot export",
                          hint="pass --no-safety-checker to export without it")
    return StableDiffusionSafetyChecker.from_pretrained(Path(ref.path) / "safety_checker", local_files_only=True)


def _components(pipe) -> tuple[str, ...]:
    """The weight-holding components an export writes and checks."""
    return ("vae", "text_encoder", "text_encoder_2", "unet") if is_sdxl(pipe) else ("vae", "text_encoder", "unet")


# format: diffusers folder -------------------------------------------------------------------

def _export_diffusers(pipe, ref, source, settings, staged: Path, reporter) -> ExportResult:
    from safetensors.torch import load_file, save_file

    _erased_pipeline(pipe, source)
    reference = unet_probe(pipe.unet)
    checker = base_safety_checker(ref) if settings.safety_checker else None
    pipe.register_modules(safety_checker=checker)
    pipe.register_to_config(requires_safety_checker=checker is not None)
    variant = None if settings.dtype == "fp32" else settings.dtype
    pipe.to(_torch_dtype(settings.dtype))
    pipe.save_pretrained(staged, safe_serialization=True, variant=variant)
    metadata = _metadata(source, ref, settings)
    for unet_file in sorted((staged / "unet").glob(f"*{FILE_SUFFIX}")):
        save_file(load_file(str(unet_file)), str(unet_file), metadata=metadata)

    loaded = type(pipe).from_pretrained(staged, variant=variant, **_load_kwargs(settings.dtype, pipe, checker is not None))
    for name in _components(pipe) + (("safety_checker",) if checker is not None else ()):
        require_same_weights(_cast(getattr(pipe, name).state_dict(), settings.dtype),
                             getattr(loaded, name).state_dict(), f"{name} of the pipeline folder")
    diff = max_abs_diff(unet_probe(loaded.unet.to(pipe.device)), reference)
    load_options = f', variant="{variant}", torch_dtype={_torch_dtype(settings.dtype)}' if variant else ""
    write_model_card(staged, source, ref, settings, diff,
                     [f'pipe = {type(pipe).__name__}.from_pretrained("{settings.output}"{load_options})'],
                     type(pipe).__name__)
    files = sorted(str(p.relative_to(staged)) for p in staged.rglob("*") if p.is_file())
    return ExportResult("diffusers", "", ref.spec, settings.dtype, diff, TOLERANCE[settings.dtype],
                        "the source UNet", files, {"variant": variant})


def write_model_card(folder: Path, source: ExportSource, ref: ModelRef, settings: ExportSettings,
                     diff: float, usage: list[str], pipeline_class: str = "StableDiffusionPipeline") -> None:
    concepts = ", ".join(source.concepts) or "(unknown concept)"
    front = ["---", "library_name: diffusers", "tags:", "  - recare", "  - concept-erasure", "  - stable-diffusion"]
    if ref.kind == "hub":
        front.append(f"base_model: {ref.spec}")
    front.append("---")
    body = [
        f"# {concepts} erased with ReCARE",
        "",
        f"Exported by recare {__version__} (`recare export --format {settings.format}`).",
        "",
        "| | |", "|---|---|",
        f"| concept | {concepts} |",
        f"| method | {source.method or 'unknown'} |",
        f"| base model | {ref.spec} |",
        f"| recare version | {__version__} |",
        f"| format | {settings.format} ({settings.dtype}) |",
        "",
        "## Loading", "", "```python", "import torch", f"from diffusers import {pipeline_class}", "",
        *usage, "```", "",
        "## Check", "",
        f"Loaded back after writing and compared with the source: max abs difference {diff:.3g} "
        f"(tolerance {TOLERANCE[settings.dtype]:g} for {settings.dtype}).",
        "",
    ]
    (folder / MODEL_CARD).write_text("\n".join(front + [""] + body), encoding="utf-8")


# format: UNet only ----------------------------------------------------------------------------

def _export_unet(pipe, ref, source, settings, staged: Path, reporter) -> ExportResult:
    from safetensors.torch import load_file, save_file

    _erased_pipeline(pipe, source)
    reference = unet_probe(pipe.unet)
    written = _cast(pipe.unet.state_dict(), settings.dtype)
    save_file(written, str(staged), metadata=_metadata(source, ref, settings))

    loaded = load_file(str(staged))
    require_same_weights(written, loaded, "UNet file")
    apply_unet_weights(pipe.unet, loaded, str(settings.output), argument="exported UNet")
    diff = max_abs_diff(unet_probe(pipe.unet), reference)
    return ExportResult("unet", "", ref.spec, settings.dtype, diff, TOLERANCE[settings.dtype], "the source UNet")


# format: original (LDM) single file ---------------------------------------------------------

# diffusers -> LDM names. The UNet's blocks are numbered differently in the two layouts: LDM counts
# `input_blocks` / `output_blocks` across levels (conv_in is input block 0; each level has
# layers_per_block resnets, plus a downsampler block on all but the last level), diffusers numbers
# levels and layers. Inside a block the names agree except for the ResNet's.
UNET_TOP_LEVEL = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
    "add_embedding.linear_1": "label_emb.0.0",  # SDXL's text_time embedding
    "add_embedding.linear_2": "label_emb.0.2",
}
RESNET_PARTS = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
MID_BLOCK_PARTS = {"resnets.0": "middle_block.0", "attentions.0": "middle_block.1", "resnets.1": "middle_block.2"}
VAE_TOP_LEVEL = {"conv_norm_out": "norm_out"}  # the rest of encoder/decoder top level keeps its name
VAE_RESNET_PARTS = {"conv_shortcut": "nin_shortcut"}
VAE_ATTENTION_PARTS = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
VAE_MID_PARTS = {"resnets.0": "mid.block_1", "attentions.0": "mid.attn_1", "resnets.1": "mid.block_2"}
OPEN_CLIP_TOP_LEVEL = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}
OPEN_CLIP_LAYER_PARTS = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
LDM_PREFIX = {"unet": "model.diffusion_model.", "vae": "first_stage_model.",
              "clip": "cond_stage_model.transformer.text_model.", "open_clip": "cond_stage_model.model.",
              # SDXL: CLIP-L and OpenCLIP-bigG side by side in the "conditioner"
              "sdxl_clip": "conditioner.embedders.0.transformer.text_model.", "sdxl_open_clip": "conditioner.embedders.1.model."}


def _split_param(key: str) -> tuple[str, str]:
    module, _, param = key.rpartition(".")
    return module, param


def _rename_part(rest: str, parts: dict[str, str]) -> str:
    """Rename the leading module path of `rest` (e.g. 'conv1.weight') by the first matching entry."""
    for old, new in parts.items():
        if rest == old or rest.startswith(old + "."):
            return new + rest[len(old):]
    return rest


def unet_key_to_ldm(key: str, layers_per_block: int, up_blocks_with_attention: set[int]) -> str:
    module, param = _split_param(key)
    if module in UNET_TOP_LEVEL:
        return f"{UNET_TOP_LEVEL[module]}.{param}"
    per_level = layers_per_block + 1
    if match := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        level, kind, layer, rest = int(match[1]), match[2], int(match[3]), match[4]
        block = 1 + level * per_level + layer
        return f"input_blocks.{block}.0.{_rename_part(rest, RESNET_PARTS)}" if kind == "resnets" \
            else f"input_blocks.{block}.1.{rest}"
    if match := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(\w+)", key):
        return f"input_blocks.{1 + int(match[1]) * per_level + layers_per_block}.0.op.{match[2]}"
    if match := re.fullmatch(r"mid_block\.((?:resnets|attentions)\.\d+)\.(.+)", key):
        if match[1] not in MID_BLOCK_PARTS:
            raise _no_ldm_name(key)
        rest = _rename_part(match[2], RESNET_PARTS) if match[1].startswith("resnets") else match[2]
        return f"{MID_BLOCK_PARTS[match[1]]}.{rest}"
    if match := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        level, kind, layer, rest = int(match[1]), match[2], int(match[3]), match[4]
        block = level * per_level + layer
        return f"output_blocks.{block}.0.{_rename_part(rest, RESNET_PARTS)}" if kind == "resnets" \
            else f"output_blocks.{block}.1.{rest}"
    if match := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(\w+)", key):
        level = int(match[1])
        # The upsampler follows the block's last resnet, and its attention when the level has one.
        position = 2 if level in up_blocks_with_attention else 1
        return f"output_blocks.{level * per_level + layers_per_block}.{position}.conv.{match[2]}"
    raise _no_ldm_name(key)


def _no_ldm_name(key: str) -> RecareError:
    return RecareError(
        f"single-file export supports Stable Diffusion 1.x/2.x and SDXL models; UNet weight '{key}' has no original-layout name",
        hint="use --format diffusers or --format unet for this model",
    )


def unet_to_ldm(state: dict, layers_per_block: int) -> dict:
    if not isinstance(layers_per_block, int):
        raise RecareError("single-file export needs the same layers_per_block on every UNet level",
                          hint="use --format diffusers or --format unet for this model")
    with_attention = {int(m[1]) for k in state if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))}
    return {unet_key_to_ldm(k, layers_per_block, with_attention): v for k, v in state.items()}


def vae_key_to_ldm(key: str, num_levels: int):
    """(LDM key, whether the weight is a linear layer the LDM VAE holds as a 1x1 conv)."""
    half, _, rest = key.partition(".")  # encoder | decoder | quant_conv | post_quant_conv
    if half not in ("encoder", "decoder"):
        return key, False
    module, param = _split_param(rest)
    if module in VAE_TOP_LEVEL:
        return f"{half}.{VAE_TOP_LEVEL[module]}.{param}", False
    if match := re.fullmatch(r"(down|up)_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", rest):
        # LDM numbers decoder levels from the lowest resolution up, diffusers in decoding order.
        level = int(match[2]) if match[1] == "down" else num_levels - 1 - int(match[2])
        return f"{half}.{match[1]}.{level}.block.{match[3]}.{_rename_part(match[4], VAE_RESNET_PARTS)}", False
    if match := re.fullmatch(r"(down|up)_blocks\.(\d+)\.(downsamplers|upsamplers)\.0\.conv\.(\w+)", rest):
        level = int(match[2]) if match[1] == "down" else num_levels - 1 - int(match[2])
        return f"{half}.{match[1]}.{level}.{match[3][:-2]}.conv.{match[4]}", False
    if match := re.fullmatch(r"mid_block\.(resnets\.\d+|attentions\.0)\.(.+)", rest):
        if match[1] not in VAE_MID_PARTS:
            raise _no_ldm_name(key)
        if match[1].startswith("resnets"):
            return f"{half}.{VAE_MID_PARTS[match[1]]}.{_rename_part(match[2], VAE_RESNET_PARTS)}", False
        renamed = _rename_part(match[2], VAE_ATTENTION_PARTS)
        return f"{half}.mid.attn_1.{renamed}", not renamed.startswith("norm.") and renamed.endswith(".weight")
    if module in ("conv_in", "conv_out"):
        return key, False
    raise _no_ldm_name(key)


def vae_to_ldm(state: dict, num_levels: int) -> dict:
    converted = {}
    for key, value in state.items():
        ldm_key, linear_as_conv = vae_key_to_ldm(key, num_levels)
        converted[ldm_key] = value[:, :, None, None] if linear_as_conv and value.ndim == 2 else value
    return converted


def _text_keys(state: dict) -> dict:
    # transformers >= 5.6 flattened CLIPTextModel; older versions nest everything under text_model.
    return {k.removeprefix("text_model."): v for k, v in state.items()}


def clip_to_ldm(state: dict, prefix: str = LDM_PREFIX["clip"]) -> dict:
    """SD 1.x (and SDXL's first encoder): OpenAI CLIP as transformers holds it, under `prefix`."""
    return {prefix + k: v for k, v in _text_keys(state).items()}


def open_clip_to_ldm(state: dict, prefix: str = LDM_PREFIX["open_clip"]) -> dict:
    """SD 2.x (and SDXL's second encoder): the OpenCLIP text tower, q/k/v fused into in_proj as open_clip stores them."""
    import torch

    state = _text_keys(state)
    converted = {}
    for key, value in state.items():
        if key == "text_projection.weight":  # SDXL's pooled projection: open_clip holds x @ P, not a Linear
            converted["text_projection"] = value.T.contiguous()
            continue
        if key in OPEN_CLIP_TOP_LEVEL:
            converted[OPEN_CLIP_TOP_LEVEL[key]] = value
            continue
        match = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)", key)
        if match is None:
            raise _no_ldm_name(f"text_encoder.{key}")
        layer, rest = match[1], match[2]
        if projection := re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", rest):
            if projection[1] == "q":  # k and v are fused in along with q
                param = projection[2]
                fused = torch.cat([state[f"encoder.layers.{layer}.self_attn.{p}_proj.{param}"] for p in "qkv"])
                converted[f"transformer.resblocks.{layer}.attn.in_proj_{param}"] = fused
            continue
        converted[f"transformer.resblocks.{layer}.{_rename_part(rest, OPEN_CLIP_LAYER_PARTS)}"] = value
    return {prefix + k: v for k, v in converted.items()}


def text_encoder_layout(pipe) -> str:
    """'clip' (SD 1.x, OpenAI CLIP: quick_gelu), 'open_clip' (SD 2.x, OpenCLIP: gelu) or 'sdxl' (both)."""
    if is_sdxl(pipe):
        return "sdxl"
    text_encoder = pipe.text_encoder
    if type(text_encoder).__name__ != "CLIPTextModel":
        raise RecareError(f"single-file export supports SD 1.x/2.x text encoders, not {type(text_encoder).__name__}",
                          hint="use --format diffusers or --format unet for this model")
    return "clip" if text_encoder.config.hidden_act == "quick_gelu" else "open_clip"


def pipeline_to_ldm(pipe) -> dict:
    """One original-layout state dict (UNet, VAE, text encoder(s)) of an SD or SDXL pipeline."""
    layout = text_encoder_layout(pipe)
    text_state = pipe.text_encoder.state_dict()
    checkpoint = {LDM_PREFIX["unet"] + k: v
                  for k, v in unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config.layers_per_block).items()}
    checkpoint.update({LDM_PREFIX["vae"] + k: v
                       for k, v in vae_to_ldm(pipe.vae.state_dict(), len(pipe.vae.config.up_block_types)).items()})
    if layout == "sdxl":
        checkpoint.update(clip_to_ldm(text_state, LDM_PREFIX["sdxl_clip"]))
        checkpoint.update(open_clip_to_ldm(pipe.text_encoder_2.state_dict(), LDM_PREFIX["sdxl_open_clip"]))
    else:
        checkpoint.update(clip_to_ldm(text_state) if layout == "clip" else open_clip_to_ldm(text_state))
    return checkpoint


def write_pipeline_configs(pipe, folder: Path) -> None:
    """The base pipeline's configs without weights: what `from_single_file(config=...)` reads offline."""
    pipe.save_config(folder)
    for name in ("unet", "vae", "scheduler"):
        getattr(pipe, name).save_config(folder / name)
    for suffix in ("", "_2") if is_sdxl(pipe) else ("",):
        getattr(pipe, f"text_encoder{suffix}").config.save_pretrained(folder / f"text_encoder{suffix}")
        getattr(pipe, f"tokenizer{suffix}").save_pretrained(folder / f"tokenizer{suffix}")
    if getattr(pipe, "feature_extractor", None) is not None:  # SD 1.x hub repos ship one, and the model index names it
        pipe.feature_extractor.save_pretrained(folder / "feature_extractor")


def _export_single_file(pipe, ref, source, settings, staged: Path, reporter) -> ExportResult:
    from safetensors.torch import save_file

    _erased_pipeline(pipe, source)
    reference = unet_probe(pipe.unet)
    layout = text_encoder_layout(pipe)
    save_file(_cast(pipeline_to_ldm(pipe), settings.dtype), str(staged),
              metadata=_metadata(source, ref, settings, text_encoder_layout=layout))

    with tempfile.TemporaryDirectory(prefix=".recare-config-", dir=staged.parent) as config_dir:
        write_pipeline_configs(pipe, Path(config_dir))
        loaded = type(pipe).from_single_file(str(staged), config=config_dir, **_load_kwargs(settings.dtype, pipe))
    for name in _components(pipe):
        require_same_weights(_cast(getattr(pipe, name).state_dict(), settings.dtype),
                             getattr(loaded, name).state_dict(), f"{name} of the single file")
    diff = max_abs_diff(unet_probe(loaded.unet.to(pipe.device)), reference)
    return ExportResult("single-file", "", ref.spec, settings.dtype, diff, TOLERANCE[settings.dtype],
                        "the source UNet", details={"text_encoder_layout": layout})


# format: LoRA ---------------------------------------------------------------------------------

@dataclass
class LoraFactors:
    tensors: dict  # diffusers/PEFT keys: unet.<module>.lora_A.weight / lora_B.weight / lora_B.bias
    reconstructed: dict  # base + B @ A (+ bias delta) per changed weight: what the file encodes
    relative_error: float  # ||dW - B A||_F / ||dW||_F over every changed weight
    layers: int
    not_representable: list[str]  # changed weights outside Linear/Conv2d layers (norms, embeddings)


def lora_factors(unet, base_state: dict, erased_state: dict, rank: int,
                 reporter: Reporter = QUIET_REPORTER) -> LoraFactors:
    """Truncated SVD of W_erased - W_base for every changed Linear / Conv2d (a conv as [out, in*kh*kw]).

    sqrt(S) goes to both factors so neither holds the whole dynamic range (it matters in fp16).
    Bias differences are exact, as PEFT's lora_B bias.
    """
    import torch

    layers = [name for name, module in unet.named_modules()
              if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))
              and getattr(module, "groups", 1) == 1
              and _changed(base_state, erased_state, f"{name}.weight", f"{name}.bias")]
    covered = {f"{name}.{p}" for name in layers for p in ("weight", "bias")}
    not_representable = sorted(k for k in base_state if k not in covered and _changed(base_state, erased_state, k))
    if not layers:
        raise RecareError(
            "the source UNet has the base model's Linear/Conv2d weights: there is no difference to export as a LoRA",
            hint="is --model the erased model instead of its base?",
        )
    any_bias_delta = any(_changed(base_state, erased_state, f"{name}.bias") for name in layers)
    tensors, reconstructed = {}, {}
    residual_energy = total_energy = 0.0
    with reporter.progress("LoRA factors (SVD)", total=len(layers)) as task:
        for name in layers:
            weight_key = f"{name}.weight"
            base_weight = base_state[weight_key].float()
            delta_weight = erased_state[weight_key].float().to(base_weight.device) - base_weight
            delta_matrix = delta_weight.reshape(delta_weight.shape[0], -1)
            u, s, vh = torch.linalg.svd(delta_matrix, full_matrices=False)
            r = min(rank, s.numel())
            sqrt_s = s[:r].sqrt()
            lora_b = u[:, :r] * sqrt_s  # [out, r]
            lora_a = sqrt_s[:, None] * vh[:r]  # [r, in * kh * kw]
            residual_energy += s[r:].square().sum().item()
            total_energy += s.square().sum().item()
            reconstructed[weight_key] = base_weight + (lora_b @ lora_a).reshape(delta_weight.shape)
            if delta_weight.ndim == 4:  # PEFT's conv LoRA: A is a kh x kw conv to r channels, B a 1x1 conv
                lora_a = lora_a.reshape(r, *delta_weight.shape[1:])
                lora_b = lora_b[:, :, None, None]
            tensors[f"unet.{name}.lora_A.weight"] = lora_a
            tensors[f"unet.{name}.lora_B.weight"] = lora_b
            if any_bias_delta:
                # PEFT gives every adapted layer a lora_B bias once one has it: write zeros where none changed.
                bias_key = f"{name}.bias"
                if bias_key in base_state:
                    delta_bias = erased_state[bias_key].float().to(base_weight.device) - base_state[bias_key].float()
                else:
                    delta_bias = torch.zeros(delta_weight.shape[0], device=base_weight.device)
                tensors[f"unet.{name}.lora_B.bias"] = delta_bias
                if bias_key in base_state:
                    reconstructed[bias_key] = base_state[bias_key].float() + delta_bias
            task.advance(1, layer=name.split(".")[0])
    relative_error = (residual_energy / total_energy) ** 0.5 if total_energy > 0 else 0.0
    return LoraFactors(tensors, reconstructed, relative_error, len(layers), not_representable)


def _changed(base_state: dict, erased_state: dict, *keys: str) -> bool:
    return any(k in base_state and not base_state[k].equal(erased_state[k].to(base_state[k].device)) for k in keys)


def _export_lora(pipe, ref, source, settings, staged: Path, reporter) -> ExportResult:
    from peft.tuners.tuners_utils import BaseTunerLayer
    from safetensors.torch import save_file

    base_state = {k: v.detach().clone() for k, v in pipe.unet.state_dict().items()}
    erased_state = _erased_pipeline(pipe, source)
    reference = unet_probe(pipe.unet)
    factors = lora_factors(pipe.unet, base_state, erased_state, settings.rank, reporter)
    if factors.not_representable:
        reporter.warn(f"{len(factors.not_representable)} changed weights are not in Linear/Conv2d layers and are "
                      f"left out of the LoRA (e.g. {', '.join(factors.not_representable[:3])})")
    save_file(_cast(factors.tensors, settings.dtype), str(staged),
              metadata=_metadata(source, ref, settings, rank=settings.rank,
                                 relative_error=f"{factors.relative_error:.6g}"))

    pipe.unet.load_state_dict({**base_state, **factors.reconstructed})
    reconstructed_probe = unet_probe(pipe.unet)
    pipe.unet.load_state_dict(base_state)
    try:
        with warnings.catch_warnings():
            # PEFT warns that a bias-free layer with a lora_B bias cannot be merged; loading is unaffected.
            warnings.filterwarnings("ignore", message=".*lora_bias=True.*")
            pipe.load_lora_weights(str(staged), adapter_name="recare")
    except (ValueError, KeyError, RuntimeError) as exc:
        raise RecareError(f"export check failed: diffusers could not load the LoRA back: "
                          f"{str(exc).splitlines()[0]}; nothing was written", hint=CHECK_FAILED_HINT) from exc
    adapted = sum(isinstance(m, BaseTunerLayer) for m in pipe.unet.modules())
    if adapted != factors.layers:
        raise RecareError(f"export check failed: diffusers adapted {adapted} UNet layers, the LoRA has "
                          f"{factors.layers}; nothing was written", hint=CHECK_FAILED_HINT)
    lora_probe = unet_probe(pipe.unet)
    diff = max_abs_diff(lora_probe, reconstructed_probe)
    return ExportResult(
        "lora", "", ref.spec, settings.dtype, diff, TOLERANCE[settings.dtype],
        f"the base plus the rank-{settings.rank} difference",
        details={"rank": settings.rank, "layers": factors.layers,
                 "relative_error": factors.relative_error,
                 "max_abs_diff_vs_source": max_abs_diff(lora_probe, reference),
                 "not_representable": len(factors.not_representable)},
    )


# format: textual-inversion tokens --------------------------------------------------------------

def _export_tokens(pipe, ref, source, settings, staged: Path, reporter) -> ExportResult:
    from safetensors.torch import save_file

    from recare_cli.models import SDXL_TOKEN_KEYS, read_learned_tokens, text_encoder_pairs

    pairs = text_encoder_pairs(pipe)
    widths = [encoder.get_input_embeddings().weight.shape[1] for encoder, _ in pairs]
    embeddings = read_learned_tokens(source.tokens_path)  # token -> [row per text encoder]
    for token, rows in embeddings.items():
        if [row.shape[-1] for row in rows] != widths:
            raise RecareError(
                f"token '{token}' has {'+'.join(str(r.shape[-1]) for r in rows)} dimensions, "
                f"the base model's text encoder(s) {'+'.join(map(str, widths))}",
                hint="the tokens were learned on another base model; pass that one with --model",
            )
    single = Path(settings.output).suffix == FILE_SUFFIX
    if single and len(embeddings) > 1:
        raise UsageError(f"the run learned {len(embeddings)} tokens ({', '.join(embeddings)}); one file holds one",
                         hint="give --output a folder name (one .safetensors per token)")
    if not single:
        staged.mkdir()
    # Token names become file names: keep them portable (learned names are already plain).
    files = {token: staged if single else staged / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', token)}{FILE_SUFFIX}"
             for token in embeddings}
    written = {}  # token -> [row per text encoder], as stored
    for token, rows in embeddings.items():
        written[token] = [row.to(_torch_dtype(settings.dtype)).contiguous() for row in rows]
        # SD: {token: vector}, what load_textual_inversion reads; SDXL: clip_l/clip_g, as A1111 and ComfyUI read it
        tensors = ({token: written[token][0]} if len(pairs) == 1
                   else {key: row.reshape(1, -1) for key, row in zip(SDXL_TOKEN_KEYS, written[token])})
        save_file(tensors, str(files[token]), metadata=_metadata(source, ref, settings, token=token))

    try:
        if len(pairs) == 1:
            pipe.load_textual_inversion([str(f) for f in files.values()])
        else:  # diffusers loads an SDXL embedding one encoder at a time
            from safetensors.torch import load_file

            for token, file in files.items():
                state = load_file(str(file))
                for key, (encoder, tokenizer) in zip(SDXL_TOKEN_KEYS, pairs):
                    pipe.load_textual_inversion(state[key], token=token, text_encoder=encoder, tokenizer=tokenizer)
    except ValueError as exc:  # e.g. a token the base tokenizer already has
        raise RecareError(f"export check failed: diffusers could not load the tokens back: {str(exc).splitlines()[0]}",
                          hint="a learned token must not be a word of the base model's vocabulary") from None
    diff = 0.0
    for token, rows in written.items():
        for (encoder, tokenizer), row in zip(pairs, rows):
            table = encoder.get_input_embeddings().weight
            diff = max(diff, max_abs_diff(table[tokenizer.convert_tokens_to_ids(token)].detach().cpu(), row.reshape(-1)))
    if not single:
        usage = [f'pipe = {type(pipe).__name__}.from_pretrained("{ref.spec}")']
        for token, file in files.items():
            path = Path(settings.output) / file.name
            if len(pairs) == 1:
                usage.append(f'pipe.load_textual_inversion("{path}")')
            else:
                usage += [f'state = safetensors.torch.load_file("{path}")',
                          f'pipe.load_textual_inversion(state["clip_l"], token="{token}", '
                          'text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)',
                          f'pipe.load_textual_inversion(state["clip_g"], token="{token}", '
                          'text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)']
        write_model_card(staged, source, ref, settings, diff, usage, type(pipe).__name__)
    names = [] if single else sorted(p.name for p in staged.iterdir())
    return ExportResult("tokens", "", ref.spec, settings.dtype, diff, TOLERANCE[settings.dtype],
                        "the learned embeddings", names, {"tokens": list(embeddings)})
