"""What `recare erase` is asked: the request, its method's defaults, its validation, and the run hash.

The run hash names the run directory: it covers every setting and input that can change the
weights, and nothing else, so a rerun with the same settings resumes the same run.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from recare_cli.erase.denoise import NSTEPS
from recare_cli.errors import UsageError
from recare_cli.numbers import check_all
from recare_cli.presets import ConceptPlan, plan_concept

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
RECARE_ONLY = ("stage2_lr", "ti_lr", "ti_steps", "rounds", "num_adv_concepts",
               "compositional_guidance_scale", "initializer_token", "care_top_k", "care_top_n", "care_min_cluster_size", "num_images",
               "center_crop", "clip_model", "clip_pretrained")
# ESD trains on the prompts alone; the concept's type picks ReCARE's CARE-set prompts and UCE's guide and templates.
NOT_ESD = RECARE_ONLY + ("concept_type",)
UCE_ONLY = ("preserve", "guide", "uce_erase_scale", "uce_preserve_scale", "uce_lamb", "uce_expand")
# What a UCE edit never reads (it trains nothing); the CARE set's inputs count only with --preserve careset.
NOT_UCE = ("train_method", "iterations", "negative_guidance", "stage1_lr", "stage2_lr", "ti_lr", "ti_steps",
           "rounds", "num_adv_concepts", "compositional_guidance_scale", "initializer_token", "center_crop",
           "prefix_steps", "apg_eta", "apg_norm_threshold", "apg_momentum", "erase_from", "resolution", "seed")
CARESET_INPUTS = ("care_top_k", "care_top_n", "care_min_cluster_size", "num_images", "clip_model", "clip_pretrained", "resolution",
                  "seed")


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
    care_min_cluster_size: int = 2  # careset's min_cluster_size
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
        ignored += NOT_ESD
    if request.method == "uce":
        ignored += tuple(f for f in NOT_UCE + RECARE_ONLY if not (uses_careset(request) and f in CARESET_INPUTS))
    else:
        ignored += UCE_ONLY
    hashed = {k: v for k, v in parameters(request).items() if k not in ignored}
    payload = {"parameters": hashed, "model": [model["model"], model["revision"]],
               "dtype": dtype, "inputs": hashes}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:8]
