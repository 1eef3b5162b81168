"""Generating images of prompts: reproducible per-image seeds, idempotent reruns, atomic writes.

Image i of a prompt with seed S uses seed S + i (the reference's convention) through its own
CPU generator, so batching or splitting across processes never changes an image.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from recare_cli.errors import RecareError, UsageError
from recare_cli.fsutil import atomic_path, ensure_writable_dir, image_problem, json_text, removing_new_dirs, write_json, write_text
from recare_cli.manifest import RUN_RECORD, Writer, claim
from recare_cli.learned_tokens import read_embeddings_files
from recare_cli.models import Runtime, library_versions
from recare_cli.numbers import SEED_LIMIT, check_all, check_job_count, parse_seed
from recare_cli.output import QUIET_REPORTER, Reporter
from recare_cli.processes import own_device, process_group

MANIFEST = "manifest.jsonl"
GENERATE = Writer("generate")
SEED_COLUMNS = ("evaluation_seed", "seed")
MAX_NAME_BYTES = 200  # of an image's file name, in UTF-8; file systems allow 255


@dataclass(frozen=True)
class PromptRow:
    prompt: str
    seed: int | None = None
    case_number: str | None = None


@dataclass(frozen=True)
class ImageJob:
    file: str
    prompt: str
    seed: int
    index: int
    case_number: str | None = None


@dataclass
class GenerateSettings:
    steps: int = 50
    guidance: float = 7.5
    height: int | None = None
    width: int | None = None
    negative_prompt: str | None = None
    batch_size: int = 1
    scheduler: str | None = None
    unet: str | None = None
    overwrite: bool = False
    embeddings: tuple[str, ...] = ()  # learned-token files (--embeddings) the text encoder(s) get


@dataclass
class GenerateSummary:
    output_dir: str
    generated: int
    skipped: int
    total: int
    files: list[str] = field(default_factory=list)
    main_process: bool = True  # False in the other processes of an `accelerate launch` run


# prompts ---------------------------------------------------------------------------------

def read_prompts(prompts: list[str] | None = None, prompts_file: Path | None = None) -> list[PromptRow]:
    rows = [PromptRow(p) for p in (prompts or []) if p.strip()]
    if prompts and not rows:
        raise UsageError("--prompt is empty")
    if prompts_file is not None:
        rows += _read_prompts_file(Path(prompts_file))
    if not rows:
        raise UsageError("no prompt given", hint="pass --prompt TEXT (repeatable) or --prompts-file FILE")
    return rows


def _read_prompts_file(path: Path) -> list[PromptRow]:
    try:
        text = path.read_text(encoding="utf-8-sig")  # spreadsheet exports start with a BOM
    except OSError as exc:
        raise UsageError(f"cannot read --prompts-file '{path}': {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise UsageError(f"--prompts-file '{path}' is not UTF-8 text") from None
    if path.suffix.lower() == ".csv":
        rows = _read_csv(path, text)
    else:
        rows = [PromptRow(line.strip()) for line in text.splitlines() if line.strip()]
    if not rows:
        raise UsageError(f"--prompts-file '{path}' holds no prompts")
    return rows


def _read_csv(path: Path, text: str) -> list[PromptRow]:
    reader = csv.DictReader(text.splitlines())
    columns = [c.strip() for c in (reader.fieldnames or [])]
    if "prompt" not in columns:
        raise UsageError(
            f"CSV '{path}' has no 'prompt' column (columns: {', '.join(columns) or 'none'})",
            hint="the COCO-30k / I2P format has prompt, evaluation_seed and case_number columns",
        )
    seed_column = next((c for c in SEED_COLUMNS if c in columns), None)
    rows = []
    for line_no, raw in enumerate(reader, start=2):
        if None in raw:  # DictReader puts the cells beyond the header under the key None
            raise UsageError(
                f"CSV '{path}' line {line_no} has more cells than the header",
                hint="quote prompts that contain commas",
            )
        record = {k.strip(): (v or "").strip() for k, v in raw.items()}
        if not record["prompt"]:
            continue
        seed = None
        if seed_column and record.get(seed_column):
            seed = parse_seed(record[seed_column], f"CSV '{path}' line {line_no}")
        rows.append(PromptRow(record["prompt"], seed, record.get("case_number") or None))
    return rows


# planning ----------------------------------------------------------------------------------

def image_filename(prompt: str, index: int, case_number: str | None = None) -> str:
    """The reference's names: prompt words joined by `_`, then `_{i}.png` (case number if given).

    File systems allow 255 bytes a name: a longer stem (emoji and CJK take 3-4 bytes a character)
    is cut to MAX_NAME_BYTES of UTF-8, on a character boundary, and ends in a hash of the whole
    stem, so two long prompts that start alike still get different names.
    """
    stem = case_number if case_number is not None else "_".join(prompt.split())
    stem = re.sub(r"[/\\\x00]", "-", stem)
    tail = f"_{index}.png"
    encoded = stem.encode("utf-8")
    if len(encoded) + len(tail) > MAX_NAME_BYTES:
        digest = hashlib.sha256(encoded).hexdigest()[:12]
        keep = MAX_NAME_BYTES - len(tail) - len(digest) - 1
        stem = f"{encoded[:keep].decode('utf-8', 'ignore')}-{digest}"
    return f"{stem}{tail}"


def plan_jobs(rows: list[PromptRow], num_images: int, seed: int) -> list[ImageJob]:
    check_all({"num_images": num_images, "seed": seed})
    check_job_count(len(rows), num_images)
    jobs: dict[str, ImageJob] = {}
    for row in rows:
        base = row.seed if row.seed is not None else seed
        if base + num_images - 1 >= SEED_LIMIT:
            raise UsageError(f"seed {base} + {num_images - 1} (the last image's) is not below 2**63",
                             hint="use a smaller --seed (or CSV seed)")
        for i in range(num_images):
            job = ImageJob(image_filename(row.prompt, i, row.case_number), row.prompt, base + i, i, row.case_number)
            previous = jobs.get(job.file)
            if previous is not None and (previous.prompt, previous.seed) != (job.prompt, job.seed):
                raise UsageError(
                    f"two different images would both be named '{job.file}'",
                    hint="give the CSV a case_number column, or remove the repeated prompt",
                )
            jobs[job.file] = job
    return list(jobs.values())


def is_readable_image(path: Path) -> bool:
    return path.is_file() and image_problem(path) is None


# generation ---------------------------------------------------------------------------------

def generate(
    rows: list[PromptRow],
    output_dir: Path,
    runtime: Runtime,
    settings: GenerateSettings | None = None,
    num_images: int = 1,
    seed: int = 42,
    reporter: Reporter = QUIET_REPORTER,
    record: dict | None = None,
    pipe=None,
) -> GenerateSummary:
    """Generate every planned image that is missing (or all, with overwrite) into `output_dir`.

    `pipe`, a pipeline the caller already holds, is used as it is (its weights, dtype, device and
    scheduler) instead of loading `runtime`'s: erase renders its training images with the model it
    is about to train when their dtypes agree.
    """
    settings = settings or GenerateSettings()
    check_all(asdict(settings))
    read_embeddings_files(settings.embeddings)  # a bad file fails now, even when every image exists already
    jobs = plan_jobs(rows, num_images, seed)
    claim(output_dir, GENERATE)
    with removing_new_dirs(output_dir):
        output_dir = ensure_writable_dir(output_dir)
        pending = _generate_missing(jobs, output_dir, runtime, settings, reporter, pipe)
    if pending is None:
        return GenerateSummary(str(output_dir), 0, 0, len(jobs), [j.file for j in jobs], main_process=False)
    _write_manifest(output_dir, jobs, {j.file for j in pending}, settings, runtime)
    write_json(output_dir / RUN_RECORD, GENERATE.stamp({
        "command": "generate",
        "arguments": {**asdict(settings), "num_images": num_images, "seed": seed,
                      "model": runtime.model, **(record or {})},
        "prompts": [asdict(r) for r in rows],
        "versions": library_versions(),
    }))
    return GenerateSummary(str(output_dir), len(pending), len(jobs) - len(pending), len(jobs), [j.file for j in jobs])


def _generate_missing(
    jobs: list[ImageJob], output_dir: Path, runtime: Runtime, settings: GenerateSettings, reporter: Reporter, pipe=None
) -> list[ImageJob] | None:
    """Render this process's share of the missing images; the jobs that were missing, or None off the main process."""
    pending = [j for j in jobs if settings.overwrite or not is_readable_image(output_dir / j.file)]
    rank, world, state = process_group(runtime)
    if state is not None:
        state.wait_for_everyone()  # every process must plan from the same folder state
    if rank != 0:
        reporter = QUIET_REPORTER  # one progress bar and one summary, from the main process
    mine = pending[rank::world]
    if mine:
        if pipe is None:
            pipe, _, _ = own_device(runtime, state).pipeline(settings.unet, settings.scheduler,
                                                             embeddings=settings.embeddings)
        reporter.info(f"Generating {len(pending)} of {len(jobs)} images with {runtime.resolve().spec} on {pipe.device}")
        render_images(pipe, mine, output_dir, settings, reporter)
    if state is not None:
        state.wait_for_everyone()
    return pending if rank == 0 else None


def render_images(pipe, jobs: list[ImageJob], output_dir: Path, settings: GenerateSettings, reporter: Reporter) -> None:
    import torch

    with reporter.progress("images", total=len(jobs)) as task, torch.inference_mode():
        for start in range(0, len(jobs), settings.batch_size):
            batch = jobs[start : start + settings.batch_size]
            images = pipe(
                prompt=[j.prompt for j in batch],
                negative_prompt=[settings.negative_prompt] * len(batch) if settings.negative_prompt else None,
                num_inference_steps=settings.steps,
                guidance_scale=settings.guidance,
                height=settings.height,
                width=settings.width,
                generator=[torch.Generator("cpu").manual_seed(j.seed) for j in batch],
            ).images
            for job, image in zip(batch, images):
                with atomic_path(output_dir / job.file) as tmp:
                    image.save(tmp, format="PNG")
            task.advance(len(batch))


def _write_manifest(
    output_dir: Path, jobs: list[ImageJob], fresh: set[str], settings: GenerateSettings, runtime: Runtime
) -> None:
    """One line per image. Images kept from an earlier run keep that run's line (their settings)."""
    path = output_dir / MANIFEST
    lines: dict[str, dict] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(line)
                lines[entry["file"]] = entry
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
    for job in jobs:
        if not (output_dir / job.file).is_file():
            raise RecareError(f"image '{job.file}' is missing after generation")
        if job.file in lines and job.file not in fresh:
            continue
        lines[job.file] = {
            "file": job.file, "prompt": job.prompt, "seed": job.seed, "index": job.index,
            "case_number": job.case_number, "steps": settings.steps, "guidance": settings.guidance,
            "height": settings.height, "width": settings.width, "negative_prompt": settings.negative_prompt,
            "scheduler": settings.scheduler, "model": runtime.model, "unet": settings.unet,
            **({"embeddings": list(settings.embeddings)} if settings.embeddings else {}),
        }
    write_text(path, "".join(json_text(entry) + "\n" for entry in lines.values()))


def read_manifest(output_dir: Path) -> list[dict]:
    path = Path(output_dir) / MANIFEST
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
