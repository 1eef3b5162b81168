"""How much the inversion saves by not back-propagating into the UNet weights (a benchmark, not a test).

Before the fix, the UNet weights an erase stage trains still asked for gradients during the
textual inversion that follows, so every inversion step computed a gradient for each of them
(thrown away). This times inversion steps on `tiny-random` at bench/erase.py's setting (512 px,
`--train-method noxattn` weights left trainable, as after an erase round) both ways, in
alternating blocks so that a busy machine slows both alike, and prints the median step times.

    python bench/inversion_grad.py [--blocks 3 --steps 5]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench_setting import SETTINGS, write_inputs  # bench/, the script's own folder


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=3, help="blocks per variant, alternating")
    parser.add_argument("--steps", type=int, default=6, help="inversion steps per block")
    args = parser.parse_args(argv)

    import torch

    import recare_cli.erase.inversion as inversion
    from recare_cli.builtins.concept_types import OBJECT_TEMPLATES
    from recare_cli.erase.context import EraseModels
    from recare_cli.erase.loop import StageLoop
    from recare_cli.erase.params import select_trainable
    from recare_cli.models import Runtime
    from recare_cli.output import quiet_libraries

    quiet_libraries()
    pipe, _, _ = Runtime("tiny-random", device="cpu", offline=True).pipeline()
    fixed = inversion.no_grad_into
    times = {"UNet weights get gradients (before)": [], "token row only (now)": []}
    with tempfile.TemporaryDirectory(prefix="recare-invbench-") as tmp:
        images, _ = write_inputs(Path(tmp), SETTINGS["num_images"], SETTINGS["resolution"])
        images = sorted(images.glob("*.png"))[:1]  # its two (flip) latents are cached after two steps
        for block in range(2 * args.blocks):
            before = block % 2 == 0
            name = list(times)[0 if before else 1]
            models = EraseModels.from_pipeline(copy.deepcopy(pipe), "cpu")
            select_trainable(models.unet, "noxattn")
            inversion.no_grad_into = (lambda module: contextlib.nullcontext()) if before else fixed
            row = models.text_encoder.get_input_embeddings().weight[inversion.initializer_id(models.tokenizer, "person")]
            token = f"token_bench{block:04d}"
            token_id = inversion.add_token(models, token, row.detach().clone())
            loop = StageLoop(Path(tmp), f"inv-{block}", args.steps, 0, 10**9)
            steps = []
            original_step_done = loop.step_done
            last = [time.perf_counter()]

            def timed(step, **losses):
                original_step_done(step, **losses)
                now = time.perf_counter()
                steps.append(now - last[0])
                last[0] = now

            loop.step_done = timed
            last[0] = time.perf_counter()
            inversion.inversion_stage(models, token_id, images, OBJECT_TEMPLATES, token,
                                      inversion.InversionSettings(args.steps, 5e-3, SETTINGS["resolution"]), loop)
            times[name] += steps[2:]  # the first steps of a block also encode the image
    inversion.no_grad_into = fixed
    print(f"tiny-random, {SETTINGS['resolution']} px, noxattn left trainable, torch threads {torch.get_num_threads()}")
    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, value in medians.items():
        print(f"{name:<40} median step {value * 1000:8.1f} ms over {len(times[name])} steps")
    first, second = medians.values()
    print(f"ratio now / before: {second / first:.3f}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
