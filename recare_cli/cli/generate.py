"""`recare generate`: images of prompts, named as the reference names them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from recare_cli.cli.common import Common, with_common


@with_common
def generate(
    common: Common,
    prompt: Annotated[Optional[list[str]], typer.Option("--prompt", "-p", help="A prompt (repeatable).")] = None,
    prompts_file: Annotated[Optional[Path], typer.Option(
        help="Text file (one prompt a line) or CSV with a prompt column and optional "
             "evaluation_seed/seed and case_number columns (COCO-30k, I2P).")] = None,
    num_images: Annotated[int, typer.Option(help="Images per prompt.")] = 1,
    seed: Annotated[int, typer.Option(help="Image i of a prompt uses seed + i (a CSV seed column wins).")] = 42,
    steps: Annotated[int, typer.Option(help="Denoising steps.")] = 50,
    guidance: Annotated[float, typer.Option(help="Classifier-free guidance scale.")] = 7.5,
    height: Annotated[Optional[int], typer.Option(help="Image height (default: the model's).")] = None,
    width: Annotated[Optional[int], typer.Option(help="Image width (default: the model's).")] = None,
    negative_prompt: Annotated[Optional[str], typer.Option(help="Negative prompt for every image.")] = None,
    batch_size: Annotated[int, typer.Option(
        help="Images per pipeline call (same seeds; pixels may differ by float rounding).")] = 1,
    scheduler: Annotated[Optional[str], typer.Option(
        help="pndm, ddim, ddpm, euler, euler-a, lms, heun, dpm++ or unipc (default: the model's).")] = None,
    unet: Annotated[Optional[str], typer.Option(
        help="Erased UNet weights: .pt, .safetensors, a UNet folder, a run directory or a cache name.")] = None,
    embeddings: Annotated[Optional[list[Path]], typer.Option(
        metavar="FILE", help="Learned tokens to use in the prompts (repeatable): the embeddings.safetensors of "
             "`recare eval --attack`, or a tokens.safetensors (SD: name → vector; SDXL: clip_l/clip_g).")] = None,
    output_dir: Annotated[Path, typer.Option(help="Where images, manifest.jsonl and the run record go.")] = Path("images"),
    overwrite: Annotated[bool, typer.Option(help="Regenerate images that already exist.")] = False,
) -> None:
    """Generate images of prompts (reruns skip images that already exist)."""
    from recare_cli import generate as core
    from recare_cli.models import Runtime, check_scheduler

    check_scheduler(scheduler)
    rows = core.read_prompts(prompt, prompts_file)
    settings = core.GenerateSettings(
        steps=steps, guidance=guidance, height=height, width=width, negative_prompt=negative_prompt,
        batch_size=batch_size, scheduler=scheduler, unet=unet, overwrite=overwrite,
        embeddings=tuple(str(path) for path in embeddings or ()),
    )
    runtime = Runtime(common.model, common.device, common.dtype, common.offline, common.cache_dir)
    reporter = common.reporter
    summary = core.generate(rows, output_dir, runtime, settings, num_images, seed, reporter)
    if not summary.main_process:
        return
    reporter.result(
        {"output_dir": summary.output_dir, "generated": summary.generated, "skipped": summary.skipped,
         "total": summary.total},
        render=lambda console: console.print(
            f"{summary.generated} generated, {summary.skipped} already there → {summary.output_dir}"),
    )
