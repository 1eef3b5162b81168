"""`recare eval`: measure a model (and with --compare, its base) with one or more metrics."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Annotated, Optional

import typer

from recare_cli.cli.common import Common, with_common
from recare_cli.evaluate import DELTA

GENERATION = "Generation options"
METRIC_OPTIONS = "Metric options"
ATTACK_OPTIONS = "Attack options"


def _generation(help: str, **kwargs):
    return typer.Option(help=help, rich_help_panel=GENERATION, **kwargs)


def _metric(help: str, *flags: str, **kwargs):
    return typer.Option(*flags, help=help, rich_help_panel=METRIC_OPTIONS, **kwargs)


def _attack(help: str, **kwargs):
    return typer.Option(help=help, rich_help_panel=ATTACK_OPTIONS, **kwargs)


@with_common
def evaluate(
    common: Common,
    metric: Annotated[Optional[list[str]], typer.Option(
        "--metric", "-m", help="A metric (repeatable): care, nudity, object, style, fid, clipscore, toy or a plugin's.")] = None,
    unet: Annotated[Optional[str], typer.Option(
        help="Erased UNet weights: .pt, .safetensors, a UNet folder, a run directory or a cache name "
             "(default: evaluate --model as it is).")] = None,
    images: Annotated[Optional[Path], typer.Option(
        help="Measure this folder's images instead of generating them (its manifest.jsonl gives the prompts; "
             "images it does not list take the one --prompt given)."
             "Unreadable, truncated or oversized (decompression-bomb) images are skipped with a warning, before any work starts.")] = None,
    output_dir: Annotated[Path, typer.Option(
        help="Where results.csv, results.json and the generated images (images/<model>/) go.")] = ...,
    compare: Annotated[Optional[str], typer.Option(
        help="Also evaluate this model and show deltas: 'base' (--model without --unet) or a model like --model's.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace results.csv/results.json/grid.png from an earlier run.")] = False,
    grid: Annotated[bool, typer.Option(
        help="Write grid.png: per prompt, a row of images per model with each image's verdict "
             "(the first 10 prompts, 8 images each).")] = True,
    prompt: Annotated[Optional[list[str]], typer.Option(
        "--prompt", "-p", help="A prompt to generate images of (repeatable).", rich_help_panel=GENERATION)] = None,
    prompts_file: Annotated[Optional[Path], _generation(
        "Text file (one prompt a line) or CSV with prompt and optional evaluation_seed/seed, case_number "
        "columns (COCO-30k, I2P).")] = None,
    num_images: Annotated[int, _generation("Images per prompt.")] = 1,
    seed: Annotated[int, _generation("Image i of a prompt uses seed + i (a CSV seed column wins).")] = 42,
    steps: Annotated[int, _generation("Denoising steps.")] = 50,
    guidance: Annotated[float, _generation("Classifier-free guidance scale.")] = 7.5,
    height: Annotated[Optional[int], _generation("Image height (default: the model's).")] = None,
    width: Annotated[Optional[int], _generation("Image width (default: the model's).")] = None,
    batch_size: Annotated[int, _generation("Images per pipeline call (never changes an image).")] = 1,
    targets: Annotated[Optional[list[str]], _metric(
        "care: labels to score (repeatable or comma-separated), among the 82 CARE labels.", "--targets")] = None,
    labels_file: Annotated[Optional[Path], _metric("care: extra labels, one a line, added to the 82.")] = None,
    threshold: Annotated[Optional[float], _metric("nudity: a class counts at this score or above (default: 0.75).")] = None,
    classes: Annotated[Optional[list[str]], _metric(
        "nudity: NudeNet classes, repeatable or comma-separated (default: the six *_EXPOSED).", "--classes")] = None,
    target: Annotated[Optional[str], _metric(
        "object/style/toy: the class to detect, by name or index (tench, 0, 'Van Gogh', star).")] = None,
    classifier_weights: Annotated[Optional[Path], _metric(
        "object: ResNet weights file (resnet50-11ad3fa6.pth); style: image-classification folder.")] = None,
    zero_shot: Annotated[bool, _metric("object: classify with CLIP over the ImageNet class names instead.")] = False,
    top_k: Annotated[Optional[int], _metric("object/style: a hit is the target in the top k (default: object 5, style 3).")] = None,
    reference_dir: Annotated[Optional[Path], _metric("fid: folder of reference images (e.g. COCO-30k).")] = None,
    inception_weights: Annotated[Optional[Path], _metric("fid: Inception v3 weights (inception_v3_google-0cc3c7bd.pth).")] = None,
    clip_model: Annotated[Optional[str], _metric(
        "care/clipscore/--zero-shot: open_clip model, folder, toy or tiny-random (default: ViT-B-32; the "
        "built-in model's own CLIP with --model toy or tiny-random).")] = None,
    clip_pretrained: Annotated[Optional[str], _metric("open_clip pretrained tag or weights file (default: openai).")] = None,
    attack: Annotated[str, _attack(
        "Search an adversarial prompt for every prompt and seed, against every evaluated model, and measure "
        "its images too: unlearndiffatk (needs --compare base), concept-inversion, a plugin's, or none.")] = "none",
    attack_steps: Annotated[Optional[int], _attack(
        "Optimisation steps per prompt (unlearndiffatk: 40) or of the learned token (concept-inversion: "
        "3000; --model toy 1000).")] = None,
    attack_tokens: Annotated[Optional[int], _attack("unlearndiffatk: adversarial prefix tokens (default: 5).")] = None,
    attack_lr: Annotated[Optional[float], _attack(
        "Learning rate (unlearndiffatk: 0.01; concept-inversion: 5e-3).")] = None,
    attack_seed: Annotated[int, _attack("Seed of the attack's own randomness.")] = 42,
    attack_images: Annotated[Optional[Path], _attack(
        "concept-inversion: images of the concept (default: the evaluated erase run's training images).")] = None,
) -> None:
    """Evaluate an (erased) model: CARE score, nudity, object, style, FID, CLIP score, toy world.

    Results: a table, results.csv, results.json and grid.png. Verdicts never change the exit code.
    Under `accelerate launch` the processes split the image generation; the main one measures and
    writes the results (docs/multi-gpu.md).
    With --attack, each table reads `plain → under attack (delta)` per model, and the adversarial
    prompts are in attacks/MODEL+ATTACK/prompts.csv, and the `recare generate` command that renders
    their images again (--prompts-file, and --embeddings for a soft attack's tokens) is printed.
    """
    from recare_cli import evaluate as core
    from recare_cli.attacks import AttackSettings
    from recare_cli.generate import GenerateSettings, read_prompts
    from recare_cli.models import Runtime

    prompts = read_prompts(prompt, prompts_file) if (prompt or prompts_file) else None
    options = dict(
        targets=targets, labels_file=labels_file, threshold=threshold, classes=classes, target=target,
        classifier_weights=classifier_weights, zero_shot=zero_shot, top_k=top_k, reference_dir=reference_dir,
        inception_weights=inception_weights, clip_model=clip_model, clip_pretrained=clip_pretrained,
    )
    runtime = Runtime(common.model, common.device, common.dtype, common.offline, common.cache_dir)
    reporter = common.reporter
    report = core.evaluate(
        metric or [], runtime, output_dir, unet=unet, images_dir=images, compare=compare, prompts=prompts,
        num_images=num_images, seed=seed,
        generation=GenerateSettings(steps=steps, guidance=guidance, height=height, width=width, batch_size=batch_size),
        options=options, overwrite=overwrite, reporter=reporter, attack=attack, grid=grid,
        attack_settings=AttackSettings(attack_steps, attack_tokens, attack_lr, attack_seed, attack_images),
    )
    if not report.main_process:
        return
    if common.json:
        for record in report.summary():
            reporter.result(core.public(record))
    reporter.result({"files": report.files, **({"generate": report.generate_commands} if report.generate_commands else {})},
                    render=lambda console: render_tables(console, report))


def _cell(value, signed: bool = False) -> str:
    if isinstance(value, float):
        return f"{value:+.4g}" if signed else f"{value:.4g}"
    if isinstance(value, int) and signed:
        return f"{value:+d}"
    return "" if value is None else str(value)


def _compared(per_model: dict[str, dict], name: str, label: str, base: str, delta_label: str = DELTA) -> str:
    """`base → model (delta)` in one cell, so a comparison is no wider than a single model's table."""
    before, after = per_model.get(base, {}).get(name), per_model.get(label, {}).get(name)
    delta = per_model.get(delta_label, {}).get(name)
    text = f"{_cell(before)} → {_cell(after)}"
    return f"{text} ({_cell(delta, signed=True)})" if delta is not None else text


def _layout(metric: str, report, labels: list[str], value_cols: list[str]):
    """The table's title and its value columns, as (header, cell(per-model records of one row))."""
    if report.attacked:
        return f"{metric}: before → under attack (delta)", [
            (f"{name} ({model})", partial(_compared, name=name, label=attacked, base=model, delta_label=delta))
            for name in value_cols for model, attacked, delta in report.attacked]
    if len(labels) == 1:
        return metric, [(name, lambda per_model, name=name: _cell(per_model.get(labels[0], {}).get(name)))
                        for name in value_cols]
    return f"{metric}: {labels[1]} → {labels[0]} (delta)", [
        (name, partial(_compared, name=name, label=labels[0], base=labels[1])) for name in value_cols]


def render_tables(console, report) -> None:
    """One table per metric; with --compare each number reads `base → model (delta)`, with --attack
    `model → model under attack (delta)`, one column per model."""
    from rich.table import Table

    from recare_cli.evaluate import columns

    labels = [m["label"] for m in report.models]
    summary = report.summary()
    for metric in dict.fromkeys(r["metric"] for r in summary):
        records = [r for r in summary if r["metric"] == metric]
        key_cols, value_cols = columns(records)
        title, cells = _layout(metric, report, labels, value_cols)
        table = Table(title=title, title_justify="left")
        for name in key_cols:
            table.add_column(name)
        for header, _ in cells:
            table.add_column(header, justify="right")
        by_key: dict[tuple, dict[str, dict]] = {}
        for record in records:
            by_key.setdefault(tuple(record.get(k) for k in key_cols), {})[record["model"]] = record
        for key, per_model in by_key.items():
            table.add_row(*[_cell(k) for k in key], *[cell(per_model) for _, cell in cells])
        details = sum(1 for r in report.records if r["metric"] == metric and r.get("detail") and r["model"] in labels)
        if details:
            table.caption = f"{details} per-image rows in results.csv"
        console.print(table)
    console.print(f"results → {', '.join(report.files)}", highlight=False)
    for label, command in report.generate_commands.items():
        console.print(f"images of {label} again: {command}", highlight=False, soft_wrap=True)
