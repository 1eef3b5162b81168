"""An erase run: inputs, the run directory, stage order, resume, outputs and registration.

Run directory (read by `export`, `eval` and `generate --unet`):
    unet.safetensors           full UNet state dict, diffusers keys (metadata: concept, method, base_model…); every method
    tokens.safetensors         learned tokens, keyed by token string; SDXL: clip_l/clip_g rows (metadata: tokens, initializer)
    careset.json               the CARE set used; recare, and uce --preserve careset
    recare-run.json            manifest: command, parameters, seeds, versions, input hashes, stage timings
    losses.jsonl               one line per training step
    images/<concept>/          generated training images (when --images is not given)
    stages/                    each finished stage's weights: what a rerun resumes from
    checkpoint.safetensors     the running stage's periodic checkpoint (deleted when the stage ends; never pickled)
    ReCARE-Diffusers-UNet.pt   with --save-pt: torch.save(state_dict), as the reference writes it
"""

from __future__ import annotations

import hashlib
import json
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from recare_cli.erase.denoise import NSTEPS
from recare_cli.erase.inputs import (
    STAGES_DIR, build_careset_for, read_careset_file, training_images, warn_foreign_careset, write_careset,
)
from recare_cli.errors import Interrupted, RecareError, UsageError
from recare_cli.fsutil import atomic_path, ensure_writable_dir, read_safetensors, write_json, write_safetensors
from recare_cli.manifest import RUN_RECORD as MANIFEST
from recare_cli.manifest import Writer, claim
from recare_cli.models import TOKENS_FILE, Runtime
from recare_cli.numbers import check_all
from recare_cli.output import QUIET_REPORTER, Reporter
from recare_cli.presets import ConceptPlan, plan_concept, slug

PT_FILE = "ReCARE-Diffusers-UNet.pt"
METHODS = ("recare", "esd", "uce")
# Defaults that differ by method; a field left at None takes its method's value (with_method_defaults).
METHOD_DEFAULTS = {
    "recare": {"negative_guidance": 2.0, "stage1_lr": 0.5e-5},  # recare-method.md §3-4
    "esd": {"negative_guidance": 1.0, "stage1_lr": 2e-5},  # esd_diffusers.py: eta 1, Adam lr 2e-5
    "uce": {"negative_guidance": 1.0, "stage1_lr": 2e-5},  # never read: UCE does not train
}
CARESET_PRESERVE = "careset"  # `--preserve careset`: UCE keeps the CARE set's words
# Fields that change where or how often things are written, never the weights; input folders and
# files enter the run hash by content (input_hashes), not by path.
NOT_HASHED = ("output_dir", "save_pt", "checkpoint_every", "report_to", "command", "images", "careset", "care_vocab",
              "gradient_checkpointing")
# What only ReCARE's inversion, CARE set and robust stage read: ESD's weights never depend on it,
# so changing it must not send an ESD rerun to a new run directory.
RECARE_ONLY = ("concept_type", "stage2_lr", "ti_lr", "ti_steps", "rounds", "num_adv_concepts",
               "compositional_guidance_scale", "initializer_token", "care_top_k", "care_top_n", "num_images",
               "center_crop", "clip_model", "clip_pretrained")
UCE_ONLY = ("preserve", "guide", "uce_erase_scale", "uce_preserve_scale", "uce_lamb", "uce_expand")
# What a UCE edit never reads (it trains nothing); the CARE set's inputs count only with --preserve careset.
NOT_UCE = ("train_method", "iterations", "negative_guidance", "stage1_lr", "stage2_lr", "ti_lr", "ti_steps",
           "rounds", "num_adv_concepts", "compositional_guidance_scale", "initializer_token", "center_crop",
           "prefix_steps", "apg_eta", "apg_norm_threshold", "apg_momentum", "erase_from", "resolution")
CARESET_INPUTS = ("care_top_k", "care_top_n", "num_images", "clip_model", "clip_pretrained", "resolution")


@dataclass
class EraseRequest:
    """Everything `recare erase` was asked; defaults are recare-method.md's."""

    concepts: list[str]
    erase_from: list[str] = field(default_factory=list)  # one for every concept, or one per concept
    method: str = "recare"
    concept_type: str | None = None
    train_method: str = "noxattn"
    iterations: int = 200
    negative_guidance: float | None = None  # recare: stage 1's g (2); esd: eta (1)
    stage1_lr: float | None = None  # recare: stage 1's AdamW rate; esd: its Adam rate
    stage2_lr: float = 2e-5
    ti_lr: float = 5e-3
    ti_steps: int = 3000
    rounds: int = 2
    num_adv_concepts: int = 2
    compositional_guidance_scale: float = 2.0
    initializer_token: str | None = None
    images: Path | None = None
    careset: Path | None = None
    care_vocab: Path | None = None  # word list the CARE set is built over (default: CLIP's whole vocabulary)
    care_top_k: int = 50  # careset's top_k_per_image
    care_top_n: int = 100  # careset's top_n_tokens
    num_images: int = 500
    resolution: int = 512
    seed: int = 42
    prefix_steps: int = NSTEPS
    center_crop: bool = False
    apg_eta: float = 1.0
    apg_norm_threshold: float = 0.0
    apg_momentum: float = 0.0
    clip_model: str | None = None  # None: tiny-random for the tiny-random base model, else ViT-B-32
    clip_pretrained: str = "openai"
    checkpoint_every: int = 100
    save_pt: bool = False
    report_to: str | None = None  # "tensorboard": losses and sample images under <run dir>/logs
    gradient_checkpointing: bool = False
    output_dir: Path | None = None
    # UCE (recare_cli/erase/uce.py); defaults of uce_sd_erase.py
    preserve: list[str] = field(default_factory=list)  # words, or ["careset"]
    guide: str | None = None  # None: "" for objects, "art" for styles
    uce_erase_scale: float = 1.0
    uce_preserve_scale: float = 1.0
    uce_lamb: float = 0.5
    uce_expand: bool = False
    command: str | None = None


def with_method_defaults(request: EraseRequest) -> EraseRequest:
    """`request` with its method's defaults for every method-dependent field still unset."""
    defaults = METHOD_DEFAULTS.get(request.method, METHOD_DEFAULTS["recare"])
    return replace(request, **{k: v for k, v in defaults.items() if getattr(request, k) is None})


def uses_careset(request: EraseRequest) -> bool:
    """Does the run read a CARE set (and so training images)?"""
    return request.method == "recare" or (request.method == "uce" and CARESET_PRESERVE in request.preserve)


@dataclass
class EraseResult:
    run_dir: Path
    cache_name: str
    unet_path: Path
    tokens: list[str]
    stages: dict = field(default_factory=dict)  # stage -> {seconds, unet_images, reused}


# validation ------------------------------------------------------------------------------------

def check_request(request: EraseRequest) -> list[ConceptPlan]:
    from recare_cli.erase.params import check_train_method
    from recare_cli.erase.tracking import check_report_to

    if request.method not in METHODS:
        raise UsageError(f"unknown --method '{request.method}'", hint=f"choose one of {', '.join(METHODS)}")
    request = with_method_defaults(request)
    if not request.concepts:
        raise UsageError("no concept given", hint="pass --concept NAME (repeatable)")
    seen = [c.strip().lower() for c in request.concepts]
    repeated = next((c for i, c in enumerate(request.concepts) if seen.index(seen[i]) != i), None)
    if repeated is not None:
        raise UsageError(f"concept '{repeated}' is given twice", hint="name each concept once")
    check_train_method(request.train_method)
    check_report_to(request.report_to)
    if len(request.erase_from) not in (0, 1, len(request.concepts)):
        raise UsageError(f"--erase-from given {len(request.erase_from)} times for {len(request.concepts)} concepts",
                         hint="give it once (for every --concept) or once per --concept, in the same order")
    if any(not prompt.strip() for prompt in request.erase_from):
        raise UsageError("--erase-from is empty", hint="name the prompt to erase the concept from, e.g. painting")
    check_all({f.name: getattr(request, f.name) for f in fields(request)})
    if request.method == "recare" and request.rounds < 1:
        raise UsageError(f"--rounds must be at least 1 with --method recare (got {request.rounds})",
                         hint="each round erases and then learns one adversarial token; use --method esd for none")
    if request.method == "uce":
        from recare_cli.erase.uce import check_uce_request

        check_uce_request(request)
    elif request.preserve or request.guide is not None:
        raise UsageError(f"--preserve and --guide are options of --method uce, not {request.method}",
                         hint="leave them out, or pass --method uce")
    plans = [plan_concept(c, request.concept_type, request.initializer_token) for c in dict.fromkeys(request.concepts)]
    if len({p.concept_type for p in plans}) > 1:
        listed = ", ".join(f"{p.concept} ({p.concept_type})" for p in plans)
        raise UsageError(f"concepts erased together must share one type: {listed}", hint="pass --type, or run them separately")
    return plans


def erase_from_prompts(request: EraseRequest) -> list[str]:
    """What each distinct concept (in check_request's plan order) is erased from: --erase-from, else itself."""
    given = request.erase_from * len(request.concepts) if len(request.erase_from) == 1 else request.erase_from
    pairs: dict[str, str] = {}
    for concept, prompt in zip(request.concepts, given or request.concepts):
        pairs.setdefault(concept, prompt)
    return list(pairs.values())


# hashing -------------------------------------------------------------------------------------------

def _file_digest(path: Path, digest) -> None:
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)


def input_hashes(request: EraseRequest) -> dict:
    from recare_cli.fsutil import list_images

    hashes = {}
    if not uses_careset(request):
        if request.images is not None:
            list_images(request.images)  # a bad --images is still a mistake worth telling
        return hashes  # ESD and plain UCE read prompts alone: no image or CARE-set input can change the weights
    if request.images is not None:
        digest = hashlib.sha256()
        for image in list_images(request.images):
            digest.update(image.name.encode())
            _file_digest(image, digest)
        hashes["images"] = digest.hexdigest()
    if request.care_vocab is not None and not Path(request.care_vocab).is_file():
        raise UsageError(f"--care-vocab '{request.care_vocab}' is not a file", hint="a word list, one word a line")
    for name in ("careset", "care_vocab"):
        if getattr(request, name) is not None:
            digest = hashlib.sha256()
            _file_digest(getattr(request, name), digest)
            hashes[name] = digest.hexdigest()
    return hashes


def parameters(request: EraseRequest) -> dict:
    return {f.name: getattr(request, f.name) for f in fields(request) if f.name != "command"}


def run_hash(request: EraseRequest, model: dict, dtype: str, hashes: dict) -> str:
    ignored = NOT_HASHED
    if request.method == "esd":
        ignored += RECARE_ONLY
    if request.method == "uce":
        ignored += tuple(f for f in NOT_UCE + RECARE_ONLY if not (uses_careset(request) and f in CARESET_INPUTS))
    else:
        ignored += UCE_ONLY
    hashed = {k: v for k, v in parameters(request).items() if k not in ignored}
    payload = {"parameters": hashed, "model": [model["model"], model["revision"]],
               "dtype": dtype, "inputs": hashes}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:8]


# the run ---------------------------------------------------------------------------------------------

class Stages:
    """Times each stage and counts its UNet images; one progress bar over all of them."""

    def __init__(self, names: list[str], counter, reporter: Reporter, previous: dict, on_record):
        self.names = names
        self.counter = counter
        self.reporter = reporter
        self.record = {k: v for k, v in previous.items() if k in names}
        self.on_record = on_record
        self._outer = None

    @contextmanager
    def outer(self):
        with self.reporter.progress("stages", total=len(self.names)) as task:
            self._outer = task
            yield self

    @contextmanager
    def stage(self, name: str, total: int | None):
        """Run one stage's body; yields its progress task."""
        self.reporter.event("stage_start", stage=name, steps=total)
        images_before = self.counter.images
        started = time.perf_counter()
        with self.reporter.progress(name, total=total) as task:
            yield task
        entry = {"seconds": round(time.perf_counter() - started, 3),
                 "unet_images": self.counter.images - images_before, "reused": False}
        self.record[name] = entry
        self.on_record(self.record)
        self.reporter.event("stage_end", stage=name, **entry)
        self._outer.advance(1)

    def reused(self, name: str) -> None:
        self.record.setdefault(name, {})["reused"] = True
        self.on_record(self.record)
        self.reporter.event("stage_reused", stage=name)
        self._outer.advance(1)


def run_erase(request: EraseRequest, runtime: Runtime, reporter: Reporter = QUIET_REPORTER) -> EraseResult:
    from recare_cli.models import library_versions

    request = with_method_defaults(request)  # the manifest records the values used
    plans = check_request(request)
    is_recare = request.method == "recare"
    with_careset = uses_careset(request)
    concepts = [p.concept for p in plans]
    careset_given = None
    if with_careset and request.careset is not None:
        careset_given = read_careset_file(Path(request.careset))
        warn_foreign_careset(careset_given, concepts, request.careset, reporter)
    hashes = input_hashes(request)  # also checks that --images holds images
    ref = runtime.resolve()
    digest = run_hash(request, ref.describe(), runtime.dtype, hashes)
    cache_name = f"{slug('-'.join(concepts))}-{digest}"
    run_dir = _run_dir(request, concepts, digest)
    ensure_writable_dir(run_dir)
    previous = _previous_manifest(run_dir, digest)

    manifest = Writer("erase", digest).stamp({
        "command": request.command, "method": request.method, "concepts": concepts,
        "type": plans[0].concept_type, "model": ref.describe(), "dtype": runtime.dtype,
        "parameters": parameters(request), "seeds": {"python": request.seed, "numpy": request.seed,
                                                      "torch": request.seed, "images": request.seed},
        "versions": library_versions(), "inputs": hashes, "run_hash": digest,
        "cache_name": cache_name, "status": "running", "stages": previous.get("stages", {}),
    })
    models = _load_models(runtime, request)
    if is_recare:
        from recare_cli.erase.inversion import initializer_id

        initializer_id(models.tokenizer, plans[0].initializer_token)  # fail before anything is written
    write_json(run_dir / MANIFEST, manifest)

    def record_stages(record: dict) -> None:  # after every stage, so an interrupted run keeps its timings
        manifest["stages"] = record
        write_json(run_dir / MANIFEST, manifest)

    try:
        # Only ReCARE's inversion and a CARE set still to build need images (ESD and UCE read prompts).
        need_images = with_careset and request.images is None and (is_recare or careset_given is None)
        stage_names = _stage_names(request, need_images=need_images, need_careset=with_careset and careset_given is None)
        stages = Stages(stage_names, models.counter, reporter, manifest["stages"], record_stages)
        with stages.outer():
            images_dirs = {}
            if with_careset and (need_images or request.images is not None):
                images_dirs = training_images(request, plans, run_dir, runtime, models, stages, reporter)
            careset = None
            if with_careset:
                careset = careset_given or build_careset_for(request, plans, images_dirs, run_dir, runtime, stages, reporter)
                write_careset(run_dir, request, careset, plans)
            if request.method == "uce":
                tokens = _edit_uce(request, plans, models, stages, careset)
            else:
                tokens = _train(request, plans, models, images_dirs, run_dir, stages, reporter, careset)
            unet_path = _write_outputs(run_dir, models, request, plans, ref.describe(), tokens)
        from recare_cli.erase.loop import LOSS_LOG
        from recare_cli.pictures import LOSSES_FILE, plot_losses

        plot_losses(run_dir / LOSS_LOG, run_dir / LOSSES_FILE)
    except BaseException as exc:
        # A stopped run must not look like one still in progress.
        stopped = isinstance(exc, (KeyboardInterrupt, Interrupted))
        manifest["status"] = "interrupted" if stopped else "failed"
        write_json(run_dir / MANIFEST, manifest)
        raise
    manifest["status"] = "complete"
    manifest["outputs"] = sorted(p.name for p in run_dir.iterdir() if not p.name.startswith("."))
    write_json(run_dir / MANIFEST, manifest)

    from recare_cli.cache import cache_root, register_erased

    register_erased(cache_root(runtime.cache_dir), cache_name, run_dir, {
        "concepts": concepts, "method": request.method, "model": ref.spec, "run_hash": digest,
        "tokens": [name for name, _ in tokens],
    })
    return EraseResult(run_dir, cache_name, unet_path, [name for name, _ in tokens], stages.record)


def _run_dir(request: EraseRequest, concepts: list[str], digest: str) -> Path:
    return Path(request.output_dir or Path("runs") / f"{slug('-'.join(concepts))}-{request.method}-{digest}")


def planned_run_dir(request: EraseRequest, runtime: Runtime) -> Path:
    """The run directory run_erase will write `request`'s run to (reads the inputs to hash them)."""
    concepts = [p.concept for p in check_request(request)]
    return _run_dir(request, concepts, run_hash(request, runtime.resolve().describe(), runtime.dtype,
                                                input_hashes(request)))


def _previous_manifest(run_dir: Path, digest: str) -> dict:
    """The manifest of an earlier attempt in `run_dir`, which must have been the same run."""
    path = run_dir / MANIFEST
    if not path.is_file():
        if any(p for p in run_dir.iterdir() if not p.name.startswith(".")):
            raise UsageError(f"--output-dir '{run_dir}' is not empty and holds no erase run",
                             hint="choose an empty or new folder")
        return {}
    claim(run_dir, Writer("erase"))  # another command's folder; another erase run is told apart below
    try:
        previous = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise RecareError(f"'{path}' is not a valid run manifest", hint="choose another --output-dir") from None
    if previous.get("run_hash") != digest:
        raise UsageError(
            f"'{run_dir}' holds a run with different settings (run hash {previous.get('run_hash')}, now {digest})",
            hint="rerun with the same settings to resume it, or choose another --output-dir",
        )
    return previous


def _stage_names(request: EraseRequest, need_images: bool, need_careset: bool) -> list[str]:
    names = ["images"] if need_images else []
    if request.method == "esd":
        return names + ["esd"]
    names += ["careset"] if need_careset else []
    if request.method == "uce":
        return names + ["uce"]
    for r in range(request.rounds):
        names += [f"erase-{r}", f"inversion-{r}"]
    return names + ["robust"]


def _load_models(runtime: Runtime, request: EraseRequest):
    from recare_cli.erase.context import EraseModels

    models = EraseModels.load(runtime)
    if request.gradient_checkpointing:  # only trained forwards (unet.train(), grad on) recompute
        models.unet.enable_gradient_checkpointing()
    return models


# training ----------------------------------------------------------------------------------------

def _train(request, plans, models, images_dirs, run_dir: Path, stages: Stages, reporter, careset) -> list[tuple[str, object]]:
    """Run (or reuse) every training stage; return the learned tokens as (name, embedding)."""
    from recare_cli.fsutil import list_images
    from recare_cli.erase.context import load_into, snapshot
    from recare_cli.erase.guidance import GuidanceKnobs
    from recare_cli.erase.inversion import (
        InversionSettings, add_token, initializer_id, inversion_stage, new_token_name, round_subset, token_embedding,
    )
    from recare_cli.erase.loop import StageLoop
    from recare_cli.erase.params import select_trainable
    from recare_cli.erase.stage1 import EraseSettings, erase_stage
    from recare_cli.erase.stage2 import robust_erase_stage
    from recare_cli.erase.tracking import make_tracker

    knobs = GuidanceKnobs(request.apg_eta, request.apg_norm_threshold, request.apg_momentum)
    trainable = select_trainable(models.unet, request.train_method)
    original = snapshot(trainable)
    stage_dir = run_dir / STAGES_DIR
    stage_dir.mkdir(exist_ok=True)
    concepts = [p.concept for p in plans]
    tokens: list[tuple[str, object]] = []

    tracker = make_tracker(request.report_to, run_dir, models, [p.image_prompt for p in plans], request.resolution,
                           request.seed)

    def loop(name: str, total: int, task) -> StageLoop:
        return StageLoop(run_dir, name, total, request.seed, request.checkpoint_every, reporter, task, tracker)

    if request.method == "esd":
        _train_esd(request, models, trainable, stages, stage_dir, loop)
        tracker.close()
        return []
    erase_settings = EraseSettings(request.iterations, request.stage1_lr, request.negative_guidance,
                                   request.resolution, request.prefix_steps, knobs)
    images = sorted({img for folder in dict.fromkeys(images_dirs.values()) for img in list_images(folder)})
    for r in range(request.rounds):
        name = f"erase-{r}"
        done = stage_dir / f"{name}.safetensors"
        if done.is_file():
            load_into(trainable, read_safetensors(done)[0])
            stages.reused(name)
        else:
            # Later rounds erase the learned token from itself, as the reference does.
            targets, erase_from = (concepts, erase_from_prompts(request)) if r == 0 else ([tokens[-1][0]], None)
            with stages.stage(name, request.iterations) as task:
                stage_loop = loop(name, request.iterations, task)
                erase_stage(models, trainable, targets, erase_settings, stage_loop, erase_from)
                stage_loop.save_stage(done, trainable)

        name = f"inversion-{r}"
        done = stage_dir / f"{name}.safetensors"
        if done.is_file():
            saved, meta = read_safetensors(done)
            token = meta["token"]
            add_token(models, token, saved[token])
            tokens.append((token, saved[token]))
            stages.reused(name)
            continue
        token = new_token_name(request.seed, r, set(models.tokenizer.get_vocab()))
        init_embedding = token_embedding(models, initializer_id(models.tokenizer, plans[0].initializer_token))
        token_id = add_token(models, token, init_embedding.clone())
        with stages.stage(name, request.ti_steps) as task:
            stage_loop = loop(name, request.ti_steps, task)
            learned = inversion_stage(models, token_id, round_subset(images, request.rounds, r), plans[0].templates, token,
                                      InversionSettings(request.ti_steps, request.ti_lr, request.resolution, request.center_crop),
                                      stage_loop)
            stage_loop.save_stage(done, {token: learned}, {"token": token})
        tokens.append((token, learned))

    name = "robust"
    done = stage_dir / f"{name}.safetensors"
    if done.is_file():
        load_into(trainable, read_safetensors(done)[0])
        stages.reused(name)
    else:
        load_into(trainable, original)
        erase_list = concepts + [t for t, _ in tokens[: request.num_adv_concepts]]
        settings = EraseSettings(request.iterations, request.stage2_lr, request.compositional_guidance_scale,
                                 request.resolution, request.prefix_steps, knobs)
        with stages.stage(name, request.iterations) as task:
            stage_loop = loop(name, request.iterations, task)
            robust_erase_stage(models, trainable, erase_list, careset.anchor, careset.retain, settings, stage_loop)
            stage_loop.save_stage(done, trainable)
    tracker.close()
    return tokens


def _train_esd(request, models, trainable: dict, stages: Stages, stage_dir: Path, loop) -> None:
    """The published ESD: one stage, one (concept, erase-from) pair per iteration."""
    from recare_cli.erase.context import load_into
    from recare_cli.erase.esd import EsdSettings, esd_stage

    concepts = list(dict.fromkeys(request.concepts))
    done = stage_dir / "esd.safetensors"
    if done.is_file():
        load_into(trainable, read_safetensors(done)[0])
        stages.reused("esd")
        return
    settings = EsdSettings(request.iterations, request.stage1_lr, request.negative_guidance,
                           request.resolution, request.prefix_steps)
    with stages.stage("esd", request.iterations) as task:
        stage_loop = loop("esd", request.iterations, task)
        esd_stage(models, trainable, concepts, erase_from_prompts(request), settings, stage_loop)
        stage_loop.save_stage(done, trainable)


def _edit_uce(request, plans, models, stages: Stages, careset) -> list:
    """UCE's closed-form edit of every cross-attention key/value projection; no tokens."""
    from recare_cli.erase.uce import UceSettings, uce_edit

    preserve = [w for w in request.preserve if w != CARESET_PRESERVE]
    if careset is not None:
        preserve += careset.words()
    settings = UceSettings(request.uce_erase_scale, request.uce_preserve_scale, request.uce_lamb, request.uce_expand)
    with stages.stage("uce", None):
        uce_edit(models, [p.concept for p in plans], plans[0].concept_type, list(dict.fromkeys(preserve)),
                 request.guide, settings)
    return []


# outputs ---------------------------------------------------------------------------------------

def _write_outputs(run_dir: Path, models, request: EraseRequest, plans, model: dict, tokens) -> Path:
    import torch

    from recare_cli import __version__
    from recare_cli.models import UNET_FILE

    state = {k: v.detach().cpu().contiguous() for k, v in models.unet.state_dict().items()}
    metadata = {"concept": ", ".join(p.concept for p in plans), "method": request.method,
                "base_model": model["model"], "base_revision": str(model["revision"]), "recare_version": __version__}
    unet_path = run_dir / UNET_FILE
    write_safetensors(unet_path, state, metadata)
    if tokens:
        from recare_cli.erase.inversion import split_rows
        from recare_cli.models import learned_tokens_tensors

        write_safetensors(run_dir / TOKENS_FILE, learned_tokens_tensors({t: split_rows(models, e) for t, e in tokens}),
                      {"tokens": json.dumps([t for t, _ in tokens]), "initializer": plans[0].initializer_token})
    if request.save_pt:
        with atomic_path(run_dir / PT_FILE) as tmp:
            torch.save(state, tmp)
    return unet_path
