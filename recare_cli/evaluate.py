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
  missing weights, `RecareError` otherwise. Load models *before* calling `ctx.images()`, so a
  missing file fails before images are generated. A verdict (an image is unsafe) is a value,
  never an exception: it must not change the exit code.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping

from recare_cli.errors import RecareError, UsageError
from recare_cli.fsutil import IMAGE_SUFFIXES, ensure_writable_dir, list_images, removing_new_dirs, write_json, write_text
from recare_cli.manifest import Writer, claim
from recare_cli.generate import GenerateSettings, PromptRow, generate, plan_jobs, read_manifest
from recare_cli.models import Runtime, library_versions, resolve_model, resolve_unet
from recare_cli.numbers import check_all
from recare_cli.output import QUIET_REPORTER, Reporter
from recare_cli.processes import launched_world, process_group

EVAL_IMAGE_SUFFIXES = IMAGE_SUFFIXES + (".webp",)
RESULTS_CSV = "results.csv"
RESULTS_JSON = "results.json"
EVAL = Writer("eval")
GRID_FILE = "grid.png"  # recare_cli.pictures draws it
DELTA = "delta"
RESERVED_COLUMNS = ("metric", "model")


@dataclass(frozen=True)
class EvalImage:
    path: Path
    prompt: str | None = None  # None for a folder without a manifest.jsonl
    seed: int | None = None

    @property
    def file(self) -> str:
        return self.path.name


@dataclass
class Row:
    key: dict[str, Any]
    values: dict[str, Any]
    detail: bool = False


@dataclass
class ModelUnderTest:
    label: str  # "erased", "model" or "base": also the images folder's name
    runtime: Runtime
    unet: str | None = None

    def describe(self) -> dict:
        return {"label": self.label, "model": self.runtime.model, "unet": self.unet}


@dataclass
class EvalContext:
    """What a metric sees of one evaluated model; see the module docstring."""

    model: ModelUnderTest
    options: Mapping[str, Any]
    reporter: Reporter
    images_dir: Path
    prompts: list[PromptRow] | None = None  # None: read `images_dir` instead of generating
    num_images: int = 1
    seed: int = 42
    generation: GenerateSettings = field(default_factory=GenerateSettings)
    cache: dict = field(default_factory=dict)  # shared by the contexts of one run
    clip_base: str | None = None  # the model whose CLIP is the default: --model's, for both sides of --compare
    _images: list[EvalImage] | None = None

    @property
    def label(self) -> str:
        return self.model.label

    @property
    def runtime(self) -> Runtime:
        return self.model.runtime

    @property
    def device(self) -> str:
        return self.runtime.torch_device()

    def option(self, name: str, default: Any = None) -> Any:
        value = self.options.get(name)
        return default if value is None else value

    def shared(self, key, factory: Callable[[], Any]) -> Any:
        if key not in self.cache:
            self.cache[key] = factory()
        return self.cache[key]

    def clip(self):
        from recare_cli.clip import DEFAULT_CLIP_PRETRAINED, default_clip_model, load_clip

        name = self.option("clip_model", default_clip_model(self.clip_base or self.runtime.model))
        pretrained = self.option("clip_pretrained", DEFAULT_CLIP_PRETRAINED)
        return self.shared(("clip", name, pretrained), lambda: load_clip(
            name, pretrained, cache_dir=self.runtime.cache_dir, offline=self.runtime.offline, device=self.device))

    def images(self) -> list[EvalImage]:
        if self._images is None:
            self._images = self._generate() if self.prompts is not None else read_image_folder(self.images_dir, "--images")
        return self._images

    def _generate(self) -> list[EvalImage]:
        settings = replace(self.generation, unet=self.model.unet)
        self.reporter.event("images", model=self.label, folder=str(self.images_dir))
        generate(self.prompts, self.images_dir, self.runtime, settings, self.num_images, self.seed,
                 self.reporter, record={"command": "eval", "label": self.label})
        # The manifest knows the seed of an image kept from an earlier run with another --seed.
        entries = {e.get("file"): e for e in read_manifest(self.images_dir)}
        return [
            EvalImage(self.images_dir / job.file, entries.get(job.file, {}).get("prompt", job.prompt),
                      entries.get(job.file, {}).get("seed", job.seed))
            for job in plan_jobs(self.prompts, self.num_images, self.seed)
        ]


def read_image_folder(folder: Path, flag: str, prompts: list[PromptRow] | None = None,
                      warn: Callable[[str], None] | None = None) -> list[EvalImage]:
    """A folder's images, with prompts and seeds from its manifest.jsonl when `recare generate` wrote it.

    Images without a manifest entry (a folder from another tool) take the one prompt given, if any;
    several prompts cannot be matched to them, which is a UsageError.
    """
    try:
        entries = {e.get("file"): e for e in read_manifest(folder) if isinstance(e, dict)}
    except ValueError:  # a damaged manifest only costs the prompts, which most metrics do not need
        entries = {}
    paths = list_images(folder, flag, EVAL_IMAGE_SUFFIXES)
    unlisted = [p for p in paths if not entries.get(p.name, {}).get("prompt")]
    fallback = None
    if prompts and not unlisted and warn is not None:
        warn(f"--prompt/--prompts-file unused: every image in {flag} has its prompt in manifest.jsonl")
    if prompts and unlisted:
        if len(prompts) > 1:
            raise UsageError(f"{len(unlisted)} of the images in {flag} '{folder}' have no manifest.jsonl entry, "
                             f"and {len(prompts)} prompts cannot be matched to them",
                             hint="give one --prompt for all of them, or a manifest.jsonl mapping file to prompt")
        fallback = prompts[0]
    return [
        EvalImage(path, entries[path.name]["prompt"], entries[path.name].get("seed")) if path not in unlisted
        else EvalImage(path, fallback.prompt if fallback else None, fallback.seed if fallback else None)
        for path in paths
    ]


def open_rgb(image: EvalImage):
    from PIL import Image

    try:
        with Image.open(image.path) as img:
            return img.convert("RGB")
    except OSError as exc:
        raise RecareError(f"cannot read image '{image.path}': {exc}") from None


# running ---------------------------------------------------------------------------------

@dataclass
class EvalReport:
    records: list[dict]  # every row of every model, flattened, then the delta rows
    models: list[dict]
    output_dir: Path
    files: list[str]
    main_process: bool = True  # False in the other processes of an `accelerate launch` run: they only render
    attacked: list[tuple[str, str, str]] = field(default_factory=list)  # (model, attacked model, their delta's label)
    generate_commands: dict[str, str] = field(default_factory=dict)  # attacked model -> `recare generate` of its images

    def summary(self) -> list[dict]:
        return [r for r in self.records if not r.get("detail")]


def option_flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_results_free(output_dir: Path, overwrite: bool, grid: bool = False) -> None:
    for name in (RESULTS_CSV, RESULTS_JSON) + ((GRID_FILE,) if grid else ()):
        if (Path(output_dir) / name).exists() and not overwrite:
            raise UsageError(f"'{Path(output_dir) / name}' already exists",
                             hint="pass --overwrite to replace it, or choose another --output-dir")


def compare_model(spec: str, primary: ModelUnderTest) -> ModelUnderTest:
    """`--compare base` is --model without --unet; anything else is a model spec like --model's."""
    runtime = primary.runtime
    if spec == "base":
        if primary.unet is None:
            raise UsageError("--compare base compares with --model itself, which is already what is evaluated",
                             hint="pass --unet ERASED, or --compare another model")
        return ModelUnderTest("base", runtime)
    resolve_model(spec, runtime.cache_dir, runtime.offline)  # fail now, not after the first model's metrics
    return ModelUnderTest("base", Runtime(spec, runtime.device, runtime.dtype, runtime.offline, runtime.cache_dir))


def evaluate(
    metric_names: list[str],
    runtime: Runtime,
    output_dir: Path,
    *,
    unet: str | None = None,
    images_dir: Path | None = None,
    compare: str | None = None,
    prompts: list[PromptRow] | None = None,
    num_images: int = 1,
    seed: int = 42,
    generation: GenerateSettings | None = None,
    options: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    reporter: Reporter = QUIET_REPORTER,
    attack: str | None = None,
    attack_settings=None,
    grid: bool = True,
) -> EvalReport:
    from recare_cli.attacks import AttackSettings
    from recare_cli.attacks.run import plan_attack, run_attack
    from recare_cli.plugins import registry

    if not metric_names:
        known = ", ".join(sorted(registry().metrics))
        raise UsageError("no metric given", hint=f"pass --metric NAME (repeatable): {known}")
    metrics = [registry().metric(name) for name in dict.fromkeys(metric_names)]
    options = dict(options or {})
    for metric in metrics:
        missing = [option_flag(name) for name in metric.requires if options.get(name) in (None, [], "")]
        if missing:
            raise UsageError(f"metric '{metric.name}' needs {' and '.join(missing)}", hint=metric.description or None)
    attack_plan = plan_attack(attack, attack_settings or AttackSettings(), images_dir=images_dir, unet=unet,
                              compare=compare, options=options, cache_dir=runtime.cache_dir, reporter=reporter)
    if images_dir is None and prompts is None:
        raise UsageError("no images to evaluate", hint="pass --prompt/--prompts-file to generate them, or --images DIR")
    if compare is not None and prompts is None:
        raise UsageError("--compare generates the base model's images and needs the prompts",
                         hint="pass --prompt or --prompts-file")
    settings = generation or GenerateSettings()
    check_all(asdict(settings))
    if prompts is not None:
        plan_jobs(prompts, num_images, seed)  # seeds, sizes and file names are checked before anything loads
    given_images = None
    if images_dir is not None:
        # Every image is checked now, and the prompts fill in for images the manifest does not list.
        given_images = read_image_folder(Path(images_dir), "--images", prompts,
                                         warn=reporter.warn if compare is None else None)
    if unet is not None:
        resolve_unet(unet, runtime.cache_dir)  # a mistyped --unet fails before anything is written
    spread = launched_world() > 1
    if spread and attack_plan is not None:
        raise UsageError("--attack runs in one process, and this eval was started by accelerate launch",
                         hint="run the attack without accelerate launch")
    main_process = not spread or process_group(runtime)[0] == 0
    if not main_process:
        reporter = QUIET_REPORTER  # the main process alone reports

    primary = ModelUnderTest("erased" if unet else "model", runtime, unet)
    models = [primary] + ([compare_model(compare, primary)] if compare is not None else [])
    cache: dict = {}
    contexts = []
    for model in models:
        given = model is primary and images_dir is not None
        ctx = EvalContext(
            model, options, reporter,
            images_dir=Path(images_dir) if given else Path(output_dir) / "images" / model.label,
            prompts=None if given else prompts, num_images=num_images, seed=seed,
            generation=settings, cache=cache, clip_base=runtime.model, _images=given_images if given else None,
        )
        contexts.append(ctx)
    claim(output_dir, EVAL)
    check_results_free(output_dir, overwrite, grid)
    if spread:
        # Every process renders its share of every model's images, all before the first metric:
        # a process waiting inside `generate` while the main one measured would time out.
        for ctx in contexts:
            if ctx.prompts is not None:
                ctx.images()
        if not main_process:
            return EvalReport([], [m.describe() for m in models], output_dir, [], main_process=False)

    records: list[dict] = []
    with removing_new_dirs(output_dir):  # a failed first run leaves no empty folder
        output_dir = ensure_writable_dir(output_dir)
        attacked = []
        if attack_plan is not None:
            # unlearndiffatk aims at the base model's images; without --compare the model is the base.
            base = contexts[-1]
            attacked = [(ctx, run_attack(attack_plan, ctx, base, output_dir, reporter)) for ctx in contexts]
        for metric in metrics:
            for ctx in contexts + [under_attack for _, under_attack in attacked]:
                reporter.event("metric", metric=metric.name, model=ctx.label)
                rows = metric.run(ctx)
                records += [flatten(metric.name, ctx.label, row) for row in check_rows(metric.name, rows)]
    if len(contexts) == 2:
        records += deltas(records, contexts[0].label, contexts[1].label)
    attacked_labels = [(ctx.label, under_attack.label, f"{DELTA} {under_attack.label}") for ctx, under_attack in attacked]
    for label, attacked_label, delta_label in attacked_labels:
        records += deltas(records, attacked_label, label, delta_label)

    commands = {}
    if attack_plan is not None:
        from recare_cli.attacks.run import generate_command

        commands = {under_attack.label: generate_command(ctx, output_dir, under_attack.label)
                    for ctx, under_attack in attacked}
    files = write_results(output_dir, records, {
        "command": "eval",
        "metrics": [m.name for m in metrics],
        "models": [m.describe() for m in models],
        "images": str(images_dir) if images_dir else None,
        "prompts": [asdict(p) for p in prompts] if prompts else None,
        "num_images": num_images, "seed": seed,
        "generation": asdict(settings),
        "options": options,
        "attack": None if attack_plan is None else {
            "name": attack_plan.name, **asdict(attack_plan.settings),
            "models": [under_attack.label for _, under_attack in attacked], "generate": commands},
        "versions": library_versions(),
    })
    if attack_plan is not None:
        from recare_cli.attacks.run import result_files

        files += [str(path) for _, under_attack in attacked for path in result_files(output_dir, under_attack.label)]
    if grid:
        from recare_cli.pictures import eval_grid

        # Before, then after: the --compare model's row above the evaluated one's, then each attacked model's.
        rows = contexts[1:] + contexts[:1] + [under_attack for _, under_attack in attacked]
        eval_grid([(ctx.label, ctx.images()) for ctx in rows], records, output_dir / GRID_FILE)
        files.append(str(output_dir / GRID_FILE))
    return EvalReport(records, [m.describe() for m in models], output_dir, files, attacked=attacked_labels,
                      generate_commands=commands)


def check_rows(metric: str, rows) -> list[Row]:
    """A plugin's mistake is reported as its mistake, not as a crash in recare."""
    if not isinstance(rows, list) or not all(isinstance(r, Row) for r in rows):
        raise RecareError(f"metric '{metric}' returned {type(rows).__name__}, not a list of Row",
                          hint="see the metric contract in recare_cli/evaluate.py")
    for row in rows:
        clash = ({*row.key} & {*row.values}) | ({*row.key, *row.values} & {*RESERVED_COLUMNS, "detail"})
        if clash:
            raise RecareError(f"metric '{metric}' returned a row with clashing column(s) {', '.join(sorted(clash))}")
    return rows


def flatten(metric: str, label: str, row: Row) -> dict:
    return {"metric": metric, "model": label, **row.key, **row.values, "detail": row.detail,
            "_key": tuple(row.key), "_values": tuple(row.values)}


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def deltas(records: list[dict], label: str, base_label: str, delta_label: str = DELTA) -> list[dict]:
    """For rows measured on both models with the same key: each number's change, model minus base."""
    def identity(record):
        return record["metric"], tuple((k, record[k]) for k in record["_key"])

    base = {identity(r): r for r in records if r["model"] == base_label}
    found = []
    for record in records:
        other = base.get(identity(record)) if record["model"] == label else None
        if other is None:
            continue
        changes = {k: record[k] - other[k] for k in record["_values"]
                   if _is_number(record[k]) and _is_number(other.get(k))}
        found.append({"metric": record["metric"], "model": delta_label, **{k: record[k] for k in record["_key"]},
                      **changes, "detail": record["detail"], "_key": record["_key"], "_values": tuple(changes)})
    return found


def public(record: dict) -> dict:
    return {k: v for k, v in record.items() if not k.startswith("_")}


def columns(records: list[dict]) -> tuple[list[str], list[str]]:
    """(key columns, value columns) in order of first appearance."""
    keys = dict.fromkeys(k for r in records for k in r["_key"])
    values = dict.fromkeys(v for r in records for v in r["_values"])
    return list(keys), list(values)


def write_results(output_dir: Path, records: list[dict], run: dict) -> list[str]:
    key_cols, value_cols = columns(records)
    header = [*RESERVED_COLUMNS, *key_cols, *value_cols, "detail"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=header, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for record in records:
        writer.writerow({**{k: "" for k in header}, **public(record), "detail": int(record["detail"])})
    csv_path, json_path = Path(output_dir) / RESULTS_CSV, Path(output_dir) / RESULTS_JSON
    write_text(csv_path, buffer.getvalue())
    # A metric can be undefined (a FID of too few images): null in JSON, empty in the CSV.
    write_json(json_path, EVAL.stamp({**run, "results": [public(r) for r in records]}), undefined_as_null=True)
    return [str(csv_path), str(json_path)]
