"""Evaluating a model: metrics, the images they measure, and the results files.

How a metric works (the contract plugins implement)
---------------------------------------------------
A metric is a `recare_cli.plugins.Metric` registered from a `recare.metrics` entry point, exactly
as recare's own (recare_cli/builtins/metrics.py)::

    from PIL import Image
    from recare_cli.evaluate import EvalContext, Row
    from recare_cli.plugins import Metric

    def brightness(ctx: EvalContext) -> list[Row]:
        rows = []
        for image in ctx.images():
            with Image.open(image.path) as img:
                value = sum(img.convert("L").getdata()) / (img.width * img.height)
            rows.append(Row({"image": image.file}, {"brightness": value}, detail=True))
        mean = sum(r.values["brightness"] for r in rows) / len(rows)
        return rows + [Row({}, {"brightness": mean})]

    def register(register):
        register(Metric("brightness", brightness, "mean grey level", requires=()))

- `run(ctx)` is called once per evaluated model (twice with `--compare`; with `--attack` also once
  per attacked model, labelled e.g. `erased+unlearndiffatk`, whose images are those of the
  adversarial prompts, each under the prompt it attacks and its seed) and returns `Row`s.
  A row's `key` says what was measured (prompt, target, image…); its `values` are the
  measurements. Rows with equal keys are matched across models for the `--compare` deltas.
  `detail=True` rows (one per image) go to the files but not to the terminal table. A detail
  row keyed by `image` may carry a short `verdict` value ("unsafe", "star: no"): grid.png
  prints it under that image.
- `ctx.images()` gives the images to measure: the `--images` folder, or images of the run's
  prompts generated on first use through the `generate` core into
  `<output-dir>/images/<model label>/` (seed + i per image, reruns reuse them), shared by every
  metric of the run.
- `ctx.option(name, default)` reads the eval options (`--target` is `"target"`, `--top-k` is
  `"top_k"`…); an option the user did not give is None. Options named in `Metric.requires` are
  checked before anything runs.
- `ctx.shared(key, factory)` keeps one object (a classifier, CLIP) for the whole run, both
  models included; `ctx.clip()` is the run's CLIP model (`--clip-model`, `--clip-pretrained`).
- Failing to measure is an exception: `UsageError` for a bad option, `ModelNotAvailable` for
  missing weights, `RecareError` otherwise. `Metric.check(ctx)`, if given, is called once before
  any image is generated or attacked, for every metric of the run: it raises these for options
  and weights the metric cannot work with, without loading models (`ctx.check_clip()` does this
  for the run's CLIP), so that a mistake in the last metric does not cost the images and the
  metrics before it. A verdict (an image is unsafe) is a value, never an exception: it must not
  change the exit code.
"""

from recare_cli.evaluate.context import EVAL_IMAGE_SUFFIXES, EvalContext, EvalImage, ModelUnderTest, Row, open_rgb
from recare_cli.evaluate.results import DELTA, columns, public, write_results
from recare_cli.evaluate.run import evaluate

__all__ = ["DELTA", "EVAL_IMAGE_SUFFIXES", "EvalContext", "EvalImage", "ModelUnderTest", "Row", "columns",
           "evaluate", "open_rgb", "public", "write_results"]
