"""Benchmark of `recare erase` (not a test): wall time and UNet forward passes per stage.

CPU mode (default) runs the whole ReCARE pipeline on `tiny-random` with the reference figure's
settings (shared/spec/tiny-random.md): 10 erase iterations, 150 inversion steps, 2 rounds,
2 adversarial concepts, 8 training images at 512 px, a 3-word CARE set (bench/bench_setting.py).
The targets are ratios to the reference's wall time on the same machine: <= 0.25 for the exact
method, <= 0.18 with --prefix-steps 10. The spec's 133.8 s was timed on a CPU where a batch-2 UNet forward took ~27 ms;
`--side-by-side` first times the reference's structure here (bench/reference_structure.py) and
uses that as the denominator.

    python bench/erase.py                     # exact method (--prefix-steps 50)
    python bench/erase.py --prefix-steps 10   # the coarser partial-denoising prefix
    python bench/erase.py --side-by-side      # the reference's structure, then ours, on this machine
    python bench/erase.py --side-by-side --prefix-steps 50,10   # one reference timing, both of ours
    python bench/erase.py --side-by-side --prefix-steps 50,10 --repeat 3   # alternated 3 times; each ratio and the median

A shared VM's speed drifts by tens of percent within minutes, so one side-by-side pair can land on
either side of a target; `--repeat` alternates reference and recare and reports every pair's ratio.
With `--side-by-side` or `--repeat` every timing runs in a fresh Python process of its own, with
the libraries imported before its clock starts: as when each is run for real, neither inherits the
other's warmed kernels or process settings (recare's `keep_freed_memory` on a CPU is process-wide;
the reference never sets it).

GPU mode builds SD-1.4-shaped UNet / VAE / text encoder from their published configs with random
weights (nothing is downloaded) and runs the default recipe (200 iterations, 3000 inversion steps,
2 rounds), reporting wall time per stage and peak CUDA memory:

    python bench/erase.py --gpu [--dtype bf16]
    python bench/erase.py --gpu --dry-run     # the same code path with shrunken models, on a CPU
    python bench/erase.py --gpu --iterations 20 --ti-steps 300   # a tenth of the recipe, for a short lease

`--family sdxl` does the same with stabilityai/stable-diffusion-xl-base-1.0's published configs
(two text encoders, 2048-wide context, text_time embedding, force_upcast VAE) at its 1024 px:

    python bench/erase.py --gpu --family sdxl [--dtype bf16]
    python bench/erase.py --gpu --family sdxl --dry-run

UNet forward passes are counted in images (a batch of 4 counts 4); image generation is not part
of the benchmark (the training images are synthetic and given with --images).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench_setting import SETTINGS, forward_ms, import_libraries, in_fresh_process, write_inputs  # bench/, the script's own folder

REFERENCE_SECONDS = 133.8
REFERENCE_FORWARD_MS = 27.0  # one batch-2 UNet forward on 64x64 latents where the reference was timed
# SD-1.4-shaped models ---------------------------------------------------------------------------

def sd14_configs(dry_run: bool) -> dict:
    """CompVis/stable-diffusion-v1-4's published configs; `dry_run` keeps the structure, shrinks widths."""
    unet = dict(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    )
    vae = dict(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
        block_out_channels=(128, 256, 512, 512), scaling_factor=0.18215,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    )
    text = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
                bos_token_id=49406, eos_token_id=49407, pad_token_id=1)
    if dry_run:  # widths only (in the real ratios, so the same shortcuts): the same blocks, layers and attention
        unet.update(block_out_channels=(32, 64, 128, 128), cross_attention_dim=32, attention_head_dim=4,
                    norm_num_groups=32)
        vae.update(block_out_channels=(32, 64, 128, 128), norm_num_groups=32)
        text.update(hidden_size=32, intermediate_size=64, num_attention_heads=4, projection_dim=32)
    return {"unet": unet, "vae": vae, "text_encoder": text}


def build_sd14_random(folder: Path, dry_run: bool) -> Path:
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from recare_cli.clipvocab import build_tokenizer

    configs = sd14_configs(dry_run)
    torch.manual_seed(0)
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**configs["vae"]), unet=UNet2DConditionModel(**configs["unet"]),
        text_encoder=CLIPTextModel(CLIPTextConfig(**configs["text_encoder"])),
        tokenizer=build_tokenizer(folder / "tokenizer-src"),
        scheduler=PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                num_train_timesteps=1000, steps_offset=1, skip_prk_steps=True,
                                set_alpha_to_one=False),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    model_dir = folder / "sd14-random"
    pipe.save_pretrained(model_dir, safe_serialization=True)
    return model_dir


# SDXL-shaped models ---------------------------------------------------------------------------

def sdxl_configs(dry_run: bool) -> dict:
    """stabilityai/stable-diffusion-xl-base-1.0's published configs; `dry_run` keeps the structure, shrinks widths."""
    unet = dict(
        sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    )
    vae = dict(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=1024,
        block_out_channels=(128, 256, 512, 512), scaling_factor=0.13025, force_upcast=True,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    )
    text = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
                bos_token_id=49406, eos_token_id=49407, pad_token_id=1)
    text_2 = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
                  vocab_size=49408, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280,
                  bos_token_id=49406, eos_token_id=49407, pad_token_id=1)
    if dry_run:
        unet.update(block_out_channels=(32, 32, 64), transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 4, 8),
                    cross_attention_dim=80, addition_time_embed_dim=8, projection_class_embeddings_input_dim=96,
                    layers_per_block=1, norm_num_groups=32)
        vae.update(block_out_channels=(32, 32, 32, 32), layers_per_block=1, norm_num_groups=32)
        text.update(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2, projection_dim=32)
        text_2.update(hidden_size=48, intermediate_size=96, num_attention_heads=4, num_hidden_layers=2, projection_dim=48)
    return {"unet": unet, "vae": vae, "text_encoder": text, "text_encoder_2": text_2}


def build_sdxl_random(folder: Path, dry_run: bool) -> Path:
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from recare_cli.clipvocab import build_tokenizer

    configs = sdxl_configs(dry_run)
    torch.manual_seed(0)
    pipe = StableDiffusionXLPipeline(
        vae=AutoencoderKL(**configs["vae"]), unet=UNet2DConditionModel(**configs["unet"]),
        text_encoder=CLIPTextModel(CLIPTextConfig(**configs["text_encoder"])),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**configs["text_encoder_2"])),
        tokenizer=build_tokenizer(folder / "tokenizer-src"),
        tokenizer_2=build_tokenizer(folder / "tokenizer-src", pad_token="!"),
        scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                         num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading"),
        add_watermarker=False,
    )
    model_dir = folder / "sdxl-random"
    pipe.save_pretrained(model_dir, safe_serialization=True)
    return model_dir


# running -------------------------------------------------------------------------------------------

def run(model: str, settings: dict, args, workdir: Path, prefix_steps: int):
    import torch

    from recare_cli.erase.run import EraseRequest, run_erase
    from recare_cli.models import Runtime
    from recare_cli.output import HUMAN, QUIET, Reporter

    images, careset = write_inputs(workdir, settings["num_images"], settings["resolution"])
    request = EraseRequest(
        concepts=["nudity"], iterations=settings["iterations"], ti_steps=settings["ti_steps"],
        rounds=settings["rounds"], num_adv_concepts=2, resolution=settings["resolution"], images=images,
        careset=careset, prefix_steps=prefix_steps, output_dir=workdir / f"run-{prefix_steps}",
        checkpoint_every=settings["checkpoint_every"],
    )
    runtime = Runtime(model, device=args.device, dtype=args.dtype, offline=True, cache_dir=args.cache_dir)
    runtime.resolve()  # builds tiny-random on first use: not part of the timing
    if runtime.torch_device().startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    result = run_erase(request, runtime, Reporter(HUMAN if args.progress else QUIET))
    wall = time.perf_counter() - started
    peak_cuda = torch.cuda.max_memory_allocated() / 2**30 if runtime.torch_device().startswith("cuda") else None
    return result, wall, peak_cuda


def report(title: str, result, wall: float, peak_cuda, reference: tuple[float, str] | None) -> None:
    print(title)
    print(f"{'stage':<14}{'seconds':>10}{'unet images':>14}")
    for stage, entry in result.stages.items():
        print(f"{stage:<14}{entry['seconds']:>10.2f}{entry['unet_images']:>14}")
    stage_total = sum(e["seconds"] for e in result.stages.values())
    images = sum(e["unet_images"] for e in result.stages.values())
    print(f"{'stages':<14}{stage_total:>10.2f}{images:>14}")
    print(f"wall seconds (model loading and outputs included): {wall:.2f}")
    if reference:
        seconds, where = reference
        print(f"ratio to the reference's {seconds:.1f} s ({where}): {wall / seconds:.3f}")
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
    if peak_cuda is not None:
        print(f"peak CUDA memory allocated: {peak_cuda:.2f} GiB")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prefix-steps", default="50",
                        help="50 = the spec's prefix; fewer = faster; several, comma-separated, run one after another")
    parser.add_argument("--gpu", action="store_true", help="SD-1.4- (or SDXL-) shaped random models, default recipe")
    parser.add_argument("--family", choices=("sd14", "sdxl"), default="sd14",
                        help="with --gpu: the published configs to shape the random models after")
    parser.add_argument("--dry-run", action="store_true", help="with --gpu: shrunken models and recipe, any device")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", help="fp32, or bf16/fp16 autocast")
    parser.add_argument("--iterations", type=int, default=None,
                        help="with --gpu: erase iterations instead of the default recipe's 200 (to fit a short lease)")
    parser.add_argument("--ti-steps", type=int, default=None,
                        help="with --gpu: inversion steps instead of the default recipe's 3000")
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--progress", action="store_true", help="draw the progress bars")
    parser.add_argument("--side-by-side", action="store_true",
                        help="CPU mode: time the reference's structure here first and compare with it")
    parser.add_argument("--json-out", type=Path, default=None,
                        help="CPU mode, one run here: also write its wall seconds to this file (for --side-by-side)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="CPU mode: time everything this many times, alternating; with --side-by-side, "
                             "every ratio and their median")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be 1 or more")
    prefixes = [int(p) for p in args.prefix_steps.split(",")]
    if len(set(prefixes)) != len(prefixes):  # one run directory each: a second would resume the first
        parser.error("--prefix-steps names a value twice; --repeat N times it again")
    if args.json_out and (len(prefixes) > 1 or args.gpu or args.side_by_side or args.repeat > 1):
        parser.error("--json-out is for one CPU run: one --prefix-steps, no --gpu, --side-by-side or --repeat")

    from recare_cli.output import quiet_libraries

    quiet_libraries()
    with tempfile.TemporaryDirectory(prefix="recare-bench-") as tmp:
        workdir = Path(tmp)
        if args.gpu:
            sdxl = args.family == "sdxl"
            recipe = dict(iterations=200, ti_steps=3000, rounds=2, num_images=8, resolution=1024 if sdxl else 512,
                          checkpoint_every=100)
            if args.dry_run:
                recipe.update(iterations=2, ti_steps=2, resolution=64, checkpoint_every=1)
            recipe.update({key: value for key, value in
                           (("iterations", args.iterations), ("ti_steps", args.ti_steps)) if value is not None})
            model = str((build_sdxl_random if sdxl else build_sd14_random)(workdir, args.dry_run))
            name = "SDXL" if sdxl else "SD-1.4"
            shape = f"shrunken {name} structure (dry run)" if args.dry_run else f"{name}-shaped, random weights"
            for prefix_steps in prefixes:
                result, wall, peak = run(model, recipe, args, workdir, prefix_steps)
                report(f"GPU recipe on {shape}: {json.dumps(recipe)}, prefix steps {prefix_steps}",
                       result, wall, peak, None)
        elif args.side_by_side or args.repeat > 1:
            compare(args, prefixes)
        else:
            recipe = dict(SETTINGS, checkpoint_every=100)
            import_libraries()
            for prefix_steps in prefixes:
                result, wall, peak = run("tiny-random", recipe, args, workdir, prefix_steps)
                calibration = forward_ms("tiny-random", args.cache_dir)
                print(f"calibration: one batch-2 UNet forward takes {calibration:.1f} ms here now "
                      f"({REFERENCE_FORWARD_MS:.0f} ms where the reference was timed); a busy or slower CPU "
                      "scales every figure below")
                report(f"tiny-random, {json.dumps(recipe)}, prefix steps {prefix_steps}, "
                       f"torch threads {__import__('torch').get_num_threads()}", result, wall, peak,
                       None if args.json_out else
                       (REFERENCE_SECONDS, f"the spec's figure, timed where a forward took {REFERENCE_FORWARD_MS:.0f} ms"))
                if args.json_out:
                    args.json_out.write_text(json.dumps({"wall": wall}))


def compare(args, prefixes: list[int]) -> None:
    """--side-by-side / --repeat: every timing in a fresh process of its own, alternating."""
    here = Path(__file__).resolve()
    passed_on = ["--device", args.device, "--dtype", args.dtype] + (["--progress"] if args.progress else [])
    cache = ["--cache-dir", str(args.cache_dir)] if args.cache_dir else []
    ratios = {prefix_steps: [] for prefix_steps in prefixes}
    for repeat in range(args.repeat):
        if args.repeat > 1:
            print(f"--- repeat {repeat + 1} of {args.repeat}", flush=True)
        reference = (REFERENCE_SECONDS, "the spec's figure")
        if args.side_by_side:
            replay = in_fresh_process(here.with_name("reference_structure.py"), cache)
            reference = (replay["wall"], "its structure, timed just now on this machine")
        for prefix_steps in prefixes:
            wall = in_fresh_process(here, ["--prefix-steps", str(prefix_steps), *passed_on, *cache])["wall"]
            ratios[prefix_steps].append(wall / reference[0])
            print(f"prefix steps {prefix_steps}: {wall:.1f} s, ratio to the reference's {reference[0]:.1f} s "
                  f"({reference[1]}): {wall / reference[0]:.3f}", flush=True)
    if args.repeat > 1:
        for prefix_steps, values in ratios.items():
            print(f"prefix steps {prefix_steps}: ratios to the reference "
                  f"{', '.join(f'{v:.3f}' for v in values)}; median {statistics.median(values):.3f}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
