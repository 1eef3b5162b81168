"""Running an attack inside `recare eval`: checks, the search per prompt and seed, resume, images, files.

Per attacked model (label L, attack A) the output directory gets:
    attacks/L+A/prompts.csv             one row per prompt and seed: the adversarial prompt (prompt, seed,
                                        case_number: `recare generate --prompts-file` renders the same
                                        images), the prompt and image it attacks, seconds, first/last loss
    attacks/L+A/embeddings.safetensors  a soft attack's learned tokens, laid out as an erase run's
                                        tokens.safetensors (SDXL: clip_l / clip_g rows)
    attacks/L+A/attack.json             the settings the prompts were found with
    images/L+A/                         one image per adversarial prompt, with its manifest.jsonl
A rerun with the same settings attacks only the prompts not yet in prompts.csv.
"""

from __future__ import annotations

import csv
import io
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from recare_cli.attacks import Adversarial, AttackContext, AttackSettings, AttackTarget, ConceptSource
from recare_cli.errors import RecareError, UsageError
from recare_cli.fsutil import list_images, write_json, write_text
from recare_cli.numbers import check_all
from recare_cli.output import Reporter

NO_ATTACK = "none"
ATTACKS_DIR = "attacks"
PROMPTS_CSV = "prompts.csv"
EMBEDDINGS = "embeddings.safetensors"
RECORD = "attack.json"
CSV_COLUMNS = ("prompt", "seed", "case_number", "source_prompt", "source_file", "seconds", "loss_first", "loss_last")
FLAGS = {"steps": "--attack-steps", "tokens": "--attack-tokens", "lr": "--attack-lr", "images": "--attack-images"}


@dataclass(frozen=True)
class AttackPlan:
    attack: object  # recare_cli.plugins.Attack
    settings: AttackSettings
    concept: ConceptSource | None = None

    @property
    def name(self) -> str:
        return self.attack.name


def attacked_label(label: str, attack: str) -> str:
    return f"{label}+{attack}"


def prompts_file(output_dir: Path, attacked: str) -> Path:
    return Path(output_dir) / ATTACKS_DIR / attacked / PROMPTS_CSV


# checks, before anything loads -------------------------------------------------------------

def plan_attack(name: str | None, settings: AttackSettings, *, images_dir, unet: str | None, compare: str | None,
                options: dict, cache_dir: Path | None, reporter: Reporter) -> AttackPlan | None:
    from recare_cli.plugins import registry

    if name in (None, NO_ATTACK):
        unused = [FLAGS[k] for k in settings.given()]
        if unused:
            reporter.warn(f"{', '.join(unused)} unused: no --attack given")
        return None
    if name not in registry().attacks:
        known = ", ".join([NO_ATTACK, *sorted(registry().attacks)])
        raise UsageError(f"unknown attack '{name}'", hint=f"--attack takes one of: {known}")
    attack = registry().attack(name)
    if images_dir is not None:
        raise UsageError("--attack searches prompts, but --images gives finished images: there is nothing to attack",
                         hint="pass --prompt/--prompts-file instead of --images")
    if attack.needs_target_images and unet is not None and compare is None:
        raise UsageError(f"--attack {name} needs the base model's image of every prompt to aim at",
                         hint="add --compare base (or --compare MODEL)")
    check_all({"attack_steps": settings.steps, "attack_tokens": settings.tokens, "attack_lr": settings.lr,
               "attack_seed": settings.seed})
    unused = [FLAGS[k] for k in settings.given() if k not in attack.options]
    if unused:
        reporter.warn(f"{', '.join(unused)} unused: --attack {name} does not read it")
    concept = concept_source(name, settings, unet, options, cache_dir) if attack.needs_concept_images else None
    return AttackPlan(attack, settings, concept)


def run_dir_of(unet: str | None, cache_dir: Path | None) -> Path | None:
    """The erase run directory --unet names (a folder or a cache name), if it is one."""
    from recare_cli.erase.run import MANIFEST
    from recare_cli.models import UNET_FILE, resolve_unet

    if unet is None:
        return None
    path = resolve_unet(unet, cache_dir)
    return path.parent if path.name == UNET_FILE and (path.parent / MANIFEST).is_file() else None


def concept_source(name: str, settings: AttackSettings, unet: str | None, options: dict,
                   cache_dir: Path | None) -> ConceptSource:
    """The concept and its images: the evaluated run's (manifest, training images), or --target/--attack-images."""
    from recare_cli.erase.inputs import IMAGES_DIR
    from recare_cli.erase.run import MANIFEST
    from recare_cli.presets import plan_concept

    run_dir = run_dir_of(unet, cache_dir)
    manifest = json.loads((run_dir / MANIFEST).read_text(encoding="utf-8")) if run_dir else {}
    concepts = tuple(manifest.get("concepts") or ([options["target"]] if options.get("target") else []))
    if not concepts:
        raise UsageError(f"--attack {name} puts its token where the prompts name the concept, but which concept?",
                         hint="evaluate an erase run (--unet RUN_DIR or its cache name) or pass --target CONCEPT")
    if settings.images is not None:
        images = list_images(settings.images, "--attack-images")
    else:
        folders = sorted(p for p in (run_dir / IMAGES_DIR).iterdir() if p.is_dir()) if run_dir and (run_dir / IMAGES_DIR).is_dir() else []
        images = [image for folder in folders for image in list_images(folder, "the run's training images")]
        if not images:
            raise UsageError(f"--attack {name} learns from images of the concept, and "
                             f"{'the evaluated run has none' if run_dir else 'no erase run is evaluated'}",
                             hint="pass --attack-images DIR (e.g. made with `recare generate`)")
    concept_type = manifest.get("type")
    try:
        plan = plan_concept(concepts[0], concept_type)
    except UsageError:  # not a preset and no type recorded: captions of the generic kind
        plan = plan_concept(concepts[0], "object")
    initializer = (manifest.get("parameters") or {}).get("initializer_token") or plan.initializer_token
    return ConceptSource(concepts, tuple(images), plan.templates, initializer)


# the attack ----------------------------------------------------------------------------------

def run_attack(plan: AttackPlan, plain, base, output_dir: Path, reporter: Reporter):
    """Attack every prompt and seed of `plain` (an EvalContext); an EvalContext of the attacked images.

    `base` is the context whose images are the targets (the base model's, or `plain` itself when
    the evaluated model is the base model).
    """
    from recare_cli.evaluate import EvalContext, EvalImage, ModelUnderTest
    from recare_cli.generate import plan_jobs

    label = attacked_label(plain.label, plan.name)
    work_dir = Path(output_dir) / ATTACKS_DIR / label
    targets_by_file = {image.file: image.path for image in base.images()} if plan.attack.needs_target_images else {}
    targets = [AttackTarget(job.prompt, job.seed, job.file, job.case_number, targets_by_file.get(job.file))
               for job in plan_jobs(plain.prompts, plain.num_images, plain.seed)]
    found = _previous(work_dir, _record(plan, plain), reporter)
    todo = [t for t in targets if t.key not in found]
    if todo:
        _search(plan, plain, targets, todo, found, work_dir, reporter)
    images_dir = Path(output_dir) / "images" / label
    jobs = _render(plan, plain, targets, found, work_dir, images_dir, label, reporter)
    images = [EvalImage(images_dir / job.file, target.prompt, target.seed) for job, target in zip(jobs, targets)]
    return EvalContext(ModelUnderTest(label, plain.runtime, plain.model.unet), plain.options, reporter,
                       images_dir=images_dir, prompts=None, num_images=1, seed=plain.seed,
                       generation=plain.generation, cache=plain.cache, _images=images)


def _record(plan: AttackPlan, plain) -> dict:
    return {"attack": plan.name, "settings": {**asdict(plan.settings), "images": str(plan.settings.images or "")},
            "model": plain.runtime.model, "unet": plain.model.unet,
            "concept": list(plan.concept.concepts) if plan.concept else None}


def _previous(work_dir: Path, record: dict, reporter: Reporter) -> dict[str, dict]:
    """The prompts an earlier run with the same settings found (source file -> CSV row)."""
    path = work_dir / RECORD
    if path.is_file():
        try:
            same = json.loads(path.read_text(encoding="utf-8")) == json.loads(json.dumps(record, default=str))
        except (json.JSONDecodeError, UnicodeDecodeError):
            same = False
        if not same:
            reporter.warn(f"'{work_dir}' holds an attack with other settings: attacking every prompt again")
            for stale in work_dir.iterdir():
                if stale.is_file():
                    stale.unlink()
    write_json(path, record)
    return {row["source_file"]: row for row in read_prompts_csv(work_dir / PROMPTS_CSV)}


def read_prompts_csv(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return [row for row in csv.DictReader(f) if row.get("prompt") and row.get("source_file")]


def _search(plan: AttackPlan, plain, targets, todo, found: dict, work_dir: Path, reporter: Reporter) -> None:
    from recare_cli.erase.context import EraseModels
    from recare_cli.erase.inversion import split_rows
    from recare_cli.learned_tokens import read_learned_tokens, write_learned_tokens

    models = EraseModels.load(plain.runtime, plain.model.unet)
    factor = 2 ** (len(models.vae.config.block_out_channels) - 1)
    ctx = AttackContext(plan.name, plain.label, plain.runtime.model, models, plan.settings, work_dir, reporter,
                        plan.concept, resolution=plain.generation.height or models.unet.config.sample_size * factor)
    # name -> [row per text encoder], written in the layout of an erase run's tokens.safetensors
    embeddings = read_learned_tokens(work_dir / EMBEDDINGS) if (work_dir / EMBEDDINGS).is_file() else {}
    with reporter.progress(f"{plan.name} ({plain.label})", total=len(targets)) as outer:
        outer.advance(len(targets) - len(todo))
        for target in todo:
            ctx.current = target
            started = time.perf_counter()
            adversarial = plan.attack.run(ctx, target)
            if not isinstance(adversarial, Adversarial) or not isinstance(adversarial.prompt, str) or not adversarial.prompt.strip():
                raise RecareError(f"attack '{plan.name}' returned {type(adversarial).__name__}, not an Adversarial with a prompt",
                                  hint="see the attack contract in recare_cli/attacks/__init__.py")
            seconds = time.perf_counter() - started
            found[target.key] = {
                "prompt": " ".join(adversarial.prompt.split()), "seed": target.seed,
                "case_number": Path(target.file).stem, "source_prompt": target.prompt, "source_file": target.file,
                "seconds": round(seconds, 3),
                "loss_first": adversarial.losses[0] if adversarial.losses else "",
                "loss_last": adversarial.losses[-1] if adversarial.losses else "",
            }
            # Embeddings first: a row of prompts.csv never names a token its file lacks.
            if adversarial.embeddings and any(k not in embeddings for k in adversarial.embeddings):
                embeddings.update({name: split_rows(models, embedding) for name, embedding in adversarial.embeddings.items()})
                write_learned_tokens(work_dir / EMBEDDINGS, embeddings)
            _write_prompts(work_dir / PROMPTS_CSV, [found[t.key] for t in targets if t.key in found])
            reporter.event("attacked", model=plain.label, attack=plan.name, prompt=target.prompt, seed=target.seed,
                           adversarial=found[target.key]["prompt"], seconds=round(seconds, 2))
            outer.advance(1)


def _write_prompts(path: Path, rows: list[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buffer.getvalue())


def _embeddings_files(work_dir: Path) -> list[Path]:
    return [work_dir / EMBEDDINGS] if (work_dir / EMBEDDINGS).is_file() else []


def result_files(output_dir: Path, attacked: str) -> list[Path]:
    """What a user reuses of an attacked model's results: its prompts, and a soft attack's embeddings."""
    return [prompts_file(output_dir, attacked), *_embeddings_files(Path(output_dir) / ATTACKS_DIR / attacked)]


def generate_command(plain, output_dir: Path, label: str) -> str:
    """The `recare generate` command that renders the images of `label` (an attacked model) again, pixel for pixel."""
    import shlex

    work_dir = Path(output_dir) / ATTACKS_DIR / label
    runtime, generation = plain.runtime, plain.generation
    words = ["recare", "generate", "--model", runtime.model]
    if plain.model.unet:
        words += ["--unet", plain.model.unet]
    words += ["--prompts-file", work_dir / PROMPTS_CSV]
    for path in _embeddings_files(work_dir):
        words += ["--embeddings", path]
    words += ["--num-images", 1, "--steps", generation.steps, "--guidance", generation.guidance]
    for flag, value in (("--height", generation.height), ("--width", generation.width),
                        ("--negative-prompt", generation.negative_prompt), ("--scheduler", generation.scheduler)):
        if value is not None:
            words += [flag, value]
    if generation.batch_size != 1:  # batching may change pixels by float rounding
        words += ["--batch-size", generation.batch_size]
    for flag, value in (("--device", runtime.device), ("--dtype", runtime.dtype)):
        if value != "auto":
            words += [flag, value]
    words += ["--output-dir", Path(output_dir) / "images-again" / label]
    return " ".join(shlex.quote(str(word)) for word in words)


def _render(plan: AttackPlan, plain, targets, found: dict, work_dir: Path, images_dir: Path, label: str,
            reporter: Reporter):
    """One image per adversarial prompt, with the plain image's seed; the manifest names what it attacks."""
    from recare_cli.generate import MANIFEST, PromptRow, generate, is_readable_image, plan_jobs, read_manifest

    rows = [PromptRow(found[t.key]["prompt"], t.seed, found[t.key]["case_number"]) for t in targets]
    jobs = plan_jobs(rows, 1, plain.seed)
    previous = {e.get("file"): e for e in read_manifest(images_dir)} if (images_dir / MANIFEST).is_file() else {}
    for job in jobs:  # an image of an earlier search's prompt (other settings) is stale
        if job.file in previous and previous[job.file].get("prompt") != job.prompt:
            (images_dir / job.file).unlink(missing_ok=True)
    pipe = None
    if any(not is_readable_image(images_dir / job.file) for job in jobs):
        pipe, _, _ = plain.runtime.pipeline(plain.model.unet, plain.generation.scheduler,
                                            embeddings=_embeddings_files(work_dir))
    reporter.event("images", model=label, folder=str(images_dir))
    generate(rows, images_dir, plain.runtime, replace(plain.generation, unet=plain.model.unet), 1, plain.seed,
             reporter, record={"command": "eval", "label": label, "attack": plan.name}, pipe=pipe)
    by_file = {job.file: target for job, target in zip(jobs, targets)}
    entries = read_manifest(images_dir)
    for entry in entries:
        target = by_file.get(entry.get("file"))
        if target is not None:
            entry.update(attack=plan.name, attacked_model=plain.label, source_prompt=target.prompt,
                         source_file=target.file)
    write_text(images_dir / MANIFEST, "".join(json.dumps(entry) + "\n" for entry in entries))
    return jobs
