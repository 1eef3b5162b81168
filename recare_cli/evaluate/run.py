"""`recare eval`'s core: check everything, measure every model (and every attacked one), write the results."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

from recare_cli.errors import UsageError
from recare_cli.evaluate.context import EvalContext, ModelUnderTest, read_image_folder
from recare_cli.evaluate.results import (DELTA, EVAL, RESULTS_CSV, RESULTS_JSON, check_rows, deltas, flatten,
                                         write_results)
from recare_cli.fsutil import ensure_writable_dir, removing_new_dirs
from recare_cli.generate import GenerateSettings, PromptRow, plan_jobs
from recare_cli.manifest import claim
from recare_cli.models import Runtime, library_versions, resolve_model, resolve_unet
from recare_cli.numbers import check_all
from recare_cli.output import QUIET_REPORTER, Reporter
from recare_cli.processes import launched_world, process_group

GRID_FILE = "grid.png"  # recare_cli.pictures draws it


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
    for metric in metrics:
        if metric.check is not None:
            metric.check(contexts[0])  # before any image is generated or attacked: a later metric must not waste them
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
