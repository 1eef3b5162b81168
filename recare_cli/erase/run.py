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

import json
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from recare_cli.erase.inputs import (
    CARESET_FILE, STAGES_DIR, build_careset_for, clip_model_for, read_careset_file, training_images,
    warn_foreign_careset, write_careset,
)
from recare_cli.erase.request import (
    CARESET_PRESERVE, EraseRequest, check_request, erase_from_prompts, input_hashes, parameters, run_hash,
    uses_careset, with_method_defaults,
)
from recare_cli.errors import Interrupted, UsageError
from recare_cli.fsutil import atomic_path, ensure_writable_dir, read_safetensors, write_json, write_safetensors
from recare_cli.manifest import RUN_RECORD as MANIFEST
from recare_cli.manifest import Writer, claim
from recare_cli.models import TOKENS_FILE, Runtime
from recare_cli.output import QUIET_REPORTER, Reporter
from recare_cli.presets import slug

PT_FILE = "ReCARE-Diffusers-UNet.pt"


@dataclass
class EraseResult:
    run_dir: Path
    cache_name: str
    unet_path: Path
    tokens: list[str]
    stages: dict = field(default_factory=dict)  # stage -> {seconds, unet_images, reused}


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
    if with_careset and careset_given is None and not (run_dir / CARESET_FILE).is_file():
        from recare_cli.clip import locate_clip

        # The CARE set's CLIP loads after the training images are rendered: check it now.
        locate_clip(clip_model_for(request, runtime), request.clip_pretrained, runtime.cache_dir, runtime.offline)
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
    request = with_method_defaults(request)  # as run_erase hashes it: an unset rate and its default are one run
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
    claim(run_dir, Writer("erase"))  # refuses a manifest it cannot read, or another command's
    previous = json.loads(path.read_text(encoding="utf-8"))
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
        from recare_cli.learned_tokens import write_learned_tokens

        write_learned_tokens(run_dir / TOKENS_FILE, {t: split_rows(models, e) for t, e in tokens},
                             {"initializer": plans[0].initializer_token})
    if request.save_pt:
        with atomic_path(run_dir / PT_FILE) as tmp:
            torch.save(state, tmp)
    return unet_path
