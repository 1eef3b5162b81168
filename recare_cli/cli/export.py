"""`recare export`: an erased model in the formats other tools load (diffusers, A1111/ComfyUI, LoRA, TI)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from recare_cli.cli.common import Common, with_common
from recare_cli.export import DEFAULT_RANK


class ExportFormat(str, Enum):
    diffusers = "diffusers"
    unet = "unet"
    single_file = "single-file"
    lora = "lora"
    tokens = "tokens"


def _model_given(ctx: typer.Context) -> bool:
    """--model typed (or set in the environment), as opposed to the default or the config file."""
    # By name: typer ships its own copy of click, whose ParameterSource is not click's.
    return ctx.get_parameter_source("model").name in ("COMMANDLINE", "ENVIRONMENT")


@with_common
def export(
    ctx: typer.Context,
    common: Common,
    source: Annotated[str, typer.Argument(
        help="A run directory, the cache name of an erased model, or erased UNet weights "
             "(.safetensors/.pt or a UNet folder; the base model comes from --model).")],
    format: Annotated[ExportFormat, typer.Option(
        "--format", "-f",
        help="diffusers (pipeline folder), unet (diffusers keys), single-file (AUTOMATIC1111/ComfyUI), "
             "lora, or tokens (textual inversion).")],
    output: Annotated[Path, typer.Option(
        "--output", "-o",
        help="A folder for diffusers (and tokens, one file per token); a .safetensors file otherwise.")],
    rank: Annotated[int, typer.Option(
        help="LoRA rank; no layer gets more than its full rank, so a large value is exact.")] = DEFAULT_RANK,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --output.")] = False,
    safety_checker: Annotated[bool, typer.Option(
        help="Keep the base model's safety checker in a diffusers export (as the base pipeline has it); "
             "--no-safety-checker leaves it out. Other formats never hold one.")] = True,
) -> None:
    """Export an erased model; every export is loaded back and checked against the source before it is kept.

    --dtype sets the stored precision (auto = fp32; fp16 writes a diffusers fp16 variant).
    --model is the base model; for a run directory it defaults to the one the run used.
    """
    from recare_cli import export as core
    from recare_cli.models import Runtime

    settings = core.ExportSettings(
        format=format.value, output=output, dtype="fp32" if common.dtype == "auto" else common.dtype,
        rank=rank, overwrite=overwrite, safety_checker=safety_checker,
    )
    export_source = core.resolve_source(source, common.cache_dir)
    explicit_model = common.model if _model_given(ctx) else None
    base_model = core.base_model_for(export_source, explicit_model, common.model)
    # Weights are loaded in fp32 and cast when written: the check compares with the fp32 source.
    runtime = Runtime(base_model, common.device, "fp32", common.offline, common.cache_dir)
    reporter = common.reporter
    result = core.export(export_source, settings, runtime, reporter)

    data = {
        "format": result.format, "output": result.output, "source": source, "base_model": result.base_model,
        "dtype": result.dtype, "max_abs_diff": result.max_abs_diff, "tolerance": result.tolerance,
        "checked_against": result.checked_against, "files": result.files, **result.details,
    }

    def render(console) -> None:
        console.print(f"exported {result.format} ({result.dtype}) → {result.output}", highlight=False)
        if result.format == "lora":
            capped = result.details["rank"] < result.details["rank_asked"]
            rank = f"rank {result.details['rank']}" + (
                f" (--rank {result.details['rank_asked']}: no changed layer is wider)" if capped else "")
            console.print(f"{rank} over {result.details['layers']} layers: relative "
                          f"approximation error {result.details['relative_error']:.4g}; UNet forward vs the "
                          f"source differs by {result.details['max_abs_diff_vs_source']:.3g}", highlight=False)
        console.print(f"check: max abs difference {result.max_abs_diff:.3g} against {result.checked_against} "
                      f"(tolerance {result.tolerance:g})", highlight=False)

    reporter.result(data, render=render)
