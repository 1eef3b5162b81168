"""`recare erase`: erase concepts with ReCARE (or the ESD / UCE baselines) and register the result."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from recare_cli.cli.common import Common, with_common

STAGE1 = "Stage 1 (erase + textual inversion)"
STAGE2 = "Stage 2 (robust erase with the CARE set)"
INPUTS = "Inputs"
SPEED = "Speed, resume and outputs"
UCE = "UCE (--method uce)"


@with_common
def erase(
    ctx: typer.Context,
    common: Common,
    concept: Annotated[Optional[list[str]], typer.Option(
        "--concept", "-c",
        help="Concept to erase (repeatable: several in one run). Presets: nudity, Van Gogh; star, stripes (--model toy).")] = None,
    recipe: Annotated[Optional[Path], typer.Option(
        # No square brackets: rich help would read [[concept]] as markup and drop it.
        help="TOML file of several runs, instead of --concept: its top-level keys (erase's flags without the "
             "dashes, e.g. iterations = 10) are shared, and each table of its array of tables named concept "
             "(concept = \"NAME\" plus that run's own keys) is one run. An entry's own keys win over flags "
             "typed here, which win over the top level. Paths are relative to the file. Runs them in order, "
             "then prints one summary; a failed entry does not stop the next, but the exit code is then 1. "
             "Under `accelerate launch` each process runs whole entries on its own GPU and the main one "
             "prints the summary (docs/multi-gpu.md).")] = None,
    method: Annotated[str, typer.Option(
        help="recare; esd (published ESD, esd_diffusers.py: Adam, lr 2e-5, eta 1; ESD-u = --train-method noxattn, "
             "ESD-x = xattn); or uce (published UCE, uce_sd_erase.py: closed-form edit of the cross-attention "
             "keys and values, seconds).")] = "recare",
    concept_type: Annotated[Optional[str], typer.Option(
        "--type", help="object, style or person; required for concepts without a preset.")] = None,
    train_method: Annotated[str, typer.Option(
        help="UNet weights trained: noxattn, xattn, xattn-strict, selfattn or full.")] = "noxattn",
    iterations: Annotated[int, typer.Option(help="Erase iterations of every erase stage.")] = 200,
    negative_guidance: Annotated[Optional[float], typer.Option(
        help="recare: stage 1's guidance g (default 2: the target is the neutral prediction); esd: eta in "
             "eps_from - eta (eps_concept - eps_neutral) (default 1).", show_default=False,
        rich_help_panel=STAGE1)] = None,
    erase_from: Annotated[Optional[list[str]], typer.Option(
        help="Prompt whose prediction is trained when erasing the concept (the reference's erase_from; "
             "default: the concept itself). Once for every --concept, or once per --concept in order; "
             "stage 1's first round; --method esd trains the erase-from prediction towards its frozen one minus "
             "eta times the concept's direction.", rich_help_panel=STAGE1)] = None,
    stage1_lr: Annotated[Optional[float], typer.Option(
        help="recare: stage 1's AdamW learning rate (default 5e-6); esd: its Adam learning rate (default 2e-5). "
             "--model toy: 3e-4 and 1e-4.", show_default=False, rich_help_panel=STAGE1)] = None,
    ti_lr: Annotated[float, typer.Option(help="Textual-inversion learning rate.", rich_help_panel=STAGE1)] = 5e-3,
    ti_steps: Annotated[int, typer.Option(help="Textual-inversion steps per round.", rich_help_panel=STAGE1)] = 3000,
    rounds: Annotated[int, typer.Option(help="Erase + inversion rounds (the reference's n_iterations).",
                                        rich_help_panel=STAGE1)] = 2,
    initializer_token: Annotated[Optional[str], typer.Option(
        help="One-token word the adversarial tokens start from (default: the preset's or the type's).",
        rich_help_panel=STAGE1)] = None,
    center_crop: Annotated[bool, typer.Option(help="Centre-crop training images before resizing.",
                                              rich_help_panel=STAGE1)] = False,
    stage2_lr: Annotated[float, typer.Option(help="Stage-2 AdamW learning rate.", rich_help_panel=STAGE2)] = 2e-5,
    num_adv_concepts: Annotated[int, typer.Option(help="Learned tokens erased in stage 2.", rich_help_panel=STAGE2)] = 2,
    compositional_guidance_scale: Annotated[float, typer.Option(
        help="S: erase concepts get -S, CARE anchors +S (one more than the intended scale).",
        rich_help_panel=STAGE2)] = 2.0,
    apg_eta: Annotated[float, typer.Option(help="APG: weight of the guidance part parallel to the prediction.",
                                           rich_help_panel=STAGE2)] = 1.0,
    apg_norm_threshold: Annotated[float, typer.Option(help="APG: clip guidance norms to this (0 = off).",
                                                      rich_help_panel=STAGE2)] = 0.0,
    apg_momentum: Annotated[float, typer.Option(help="APG: momentum of the guidance direction (0 = off).",
                                                rich_help_panel=STAGE2)] = 0.0,
    images: Annotated[Optional[Path], typer.Option(
        help="Training images of the concept (default: generate --num-images into the run directory)."
             " Unreadable, truncated or oversized (decompression-bomb) images are skipped with a warning, before any work starts.",
        rich_help_panel=INPUTS)] = None,
    careset: Annotated[Optional[Path], typer.Option(
        help="CARE set JSON (default: built from the images with `recare careset`'s method).", rich_help_panel=INPUTS)] = None,
    care_vocab: Annotated[Optional[Path], typer.Option(
        help="Word list (one word a line) to build the CARE set over, instead of CLIP's whole vocabulary "
             "(default for --model toy: the toy world's words).", rich_help_panel=INPUTS)] = None,
    care_top_k: Annotated[int, typer.Option(
        help="CARE set: candidate tokens counted per image (careset's --top-k-per-image).", rich_help_panel=INPUTS)] = 50,
    care_top_n: Annotated[int, typer.Option(
        help="CARE set: most frequent tokens clustered (careset's --top-n-tokens).", rich_help_panel=INPUTS)] = 100,
    care_min_cluster_size: Annotated[int, typer.Option(
        help="CARE set: smallest cluster whose outliers are refined away (careset's --min-cluster-size; "
             "--model toy: 3).", rich_help_panel=INPUTS)] = 2,
    num_images: Annotated[int, typer.Option(help="Training images to generate per concept.", rich_help_panel=INPUTS)] = 500,
    clip_model: Annotated[Optional[str], typer.Option(
        help="CLIP for building the CARE set (default ViT-B-32; a built-in model's own: toy, tiny-random).",
        rich_help_panel=INPUTS)] = None,
    clip_pretrained: Annotated[str, typer.Option(help="open_clip weights tag or file for --clip-model.",
                                                 rich_help_panel=INPUTS)] = "openai",
    resolution: Annotated[int, typer.Option(help="Image size for training (--model toy: 32).")] = 512,
    seed: Annotated[int, typer.Option(help="Seed of python random, numpy and torch; images use seed + i.")] = 42,
    prefix_steps: Annotated[int, typer.Option(
        help="DDIM steps of the partial-denoising schedule (50 = the method exactly; fewer is faster, approximate).",
        rich_help_panel=SPEED)] = 50,
    checkpoint_every: Annotated[int, typer.Option(help="Save a resumable checkpoint every N steps.",
                                                  rich_help_panel=SPEED)] = 100,
    save_pt: Annotated[bool, typer.Option(help="Also write the reference's ReCARE-Diffusers-UNet.pt.",
                                          rich_help_panel=SPEED)] = False,
    gradient_checkpointing: Annotated[bool, typer.Option(
        help="Recompute UNet activations in the backward pass: less memory (SDXL), slower; same weights.",
        rich_help_panel=SPEED)] = False,
    output_dir: Annotated[Optional[Path], typer.Option(
        help="Run directory (default runs/<concept>-<method>-<hash>); rerunning resumes it.",
        rich_help_panel=SPEED)] = None,
    report_to: Annotated[Optional[str], typer.Option(
        help="tensorboard: log every step's losses and 2 sample images per concept after each training stage to "
             "<run dir>/logs (needs the tensorboard package; view with tensorboard --logdir runs/).",
        rich_help_panel=SPEED)] = None,
    preserve: Annotated[Optional[list[str]], typer.Option(
        help="Concept UCE keeps (repeatable), or 'careset': the CARE set's words, built as for recare "
             "(from --images or generated ones, or --careset).", rich_help_panel=UCE)] = None,
    guide: Annotated[Optional[str], typer.Option(
        help="Prompt the erased concepts are mapped to (default: empty for objects, 'art' for styles).",
        rich_help_panel=UCE)] = None,
    uce_erase_scale: Annotated[float, typer.Option(help="Weight of the erase concepts.", rich_help_panel=UCE)] = 1.0,
    uce_preserve_scale: Annotated[float, typer.Option(help="Weight of the preserve concepts.", rich_help_panel=UCE)] = 1.0,
    uce_lamb: Annotated[float, typer.Option(help="Lambda: how strongly the weights stay as they were.",
                                            rich_help_panel=UCE)] = 0.5,
    uce_expand: Annotated[bool, typer.Option(
        help="Also erase 5 templated prompts per concept (objects: 'photo of ...'; styles: 'art by ...').",
        rich_help_panel=UCE)] = False,
) -> None:
    """Erase concepts from the model; a rerun of the same command resumes where it stopped.

    Example: recare erase --concept nudity   (generates images, builds the CARE set, trains).
    Several concepts, each its own run: recare erase --recipe concepts.toml
    """
    from recare_cli.erase.run import EraseRequest
    from recare_cli.errors import UsageError
    from recare_cli.models import Runtime
    from recare_cli.plugins import registry
    from recare_cli.presets import with_model_defaults

    if recipe is not None and concept:
        raise UsageError("--recipe and --concept cannot be used together",
                         hint="put the concepts in the recipe's [[concept]] tables, or leave out --recipe")
    if recipe is None and not concept:
        raise UsageError("no concept given", hint="pass --concept NAME (repeatable) or --recipe FILE.toml")
    request = EraseRequest(
        concepts=concept or [], erase_from=erase_from or [], method=method, concept_type=concept_type, train_method=train_method,
        iterations=iterations, negative_guidance=negative_guidance, stage1_lr=stage1_lr, stage2_lr=stage2_lr,
        ti_lr=ti_lr, ti_steps=ti_steps, rounds=rounds, num_adv_concepts=num_adv_concepts,
        compositional_guidance_scale=compositional_guidance_scale, initializer_token=initializer_token,
        images=images, careset=careset, care_vocab=care_vocab, care_top_k=care_top_k,
        care_top_n=care_top_n, care_min_cluster_size=care_min_cluster_size, num_images=num_images, resolution=resolution, seed=seed,
        prefix_steps=prefix_steps, center_crop=center_crop, apg_eta=apg_eta,
        apg_norm_threshold=apg_norm_threshold, apg_momentum=apg_momentum, clip_model=clip_model,
        clip_pretrained=clip_pretrained, checkpoint_every=checkpoint_every, save_pt=save_pt,
        report_to=report_to, output_dir=output_dir, preserve=preserve or [], guide=guide, uce_erase_scale=uce_erase_scale,
        uce_preserve_scale=uce_preserve_scale, uce_lamb=uce_lamb, uce_expand=uce_expand,
        gradient_checkpointing=gradient_checkpointing, command=shlex.join(["recare", *sys.argv[1:]]),
    )
    runtime = Runtime(common.model, common.device, common.dtype, common.offline, common.cache_dir)
    reporter = common.reporter
    # By name: typer ships its own copy of click, whose ParameterSource is not click's.
    sources = {name: ctx.get_parameter_source(name).name for name in ctx.params}
    typed = {name for name, source in sources.items() if source in ("COMMANDLINE", "ENVIRONMENT")}
    configured = {name for name, source in sources.items() if source == "DEFAULT_MAP"}
    if recipe is not None:
        from recare_cli.erase.recipe import plan_entries, read_recipe, run_recipe

        parsed = read_recipe(recipe)
        run_recipe(parsed, plan_entries(parsed, request, runtime, typed, configured), reporter)
        return
    request = with_model_defaults(request, common.model, typed | configured)
    result = registry().method(method).run(request, runtime, reporter)

    def render(console) -> None:
        console.print(f"erased {', '.join(concept)} ({method}) → {result.unet_path}")
        if result.tokens:
            console.print(f"learned tokens: {', '.join(result.tokens)}")
        console.print(f"registered as '{result.cache_name}' (use it with generate --unet, eval, export)")

    reporter.result(
        {"run_dir": str(result.run_dir), "unet": str(result.unet_path), "cache_name": result.cache_name,
         "tokens": result.tokens, "stages": result.stages},
        render=render,
    )
