"""Erasure against what else goes, per method, on the toy world (a benchmark, not a test).

Erases `star` from `--model toy` with esd, uce, uce --preserve careset, recare (exact) and recare
--prefix-steps 10, each over a range of strengths, and measures every model with the toy
classifier on prompts no erase trained on (docs/frontier.md explains the groups):

- target rate on common-context prompts (colours, backgrounds, styles named in >= 10% of the toy
  world's captions of a star) and on rare-context ones (< 10%: derived from the captions here);
- each CARE concept's rate on its own prompts and on target prompts that name it, as % of base;
- every other concept's rate on its own prompts as % of base; night (the concept star co-occurs
  with most) on its own and with the target, wherever the CARE set put it;
- the ReCARE default's adversarial tokens' target rate, and training time.

Strengths: recare, the stage-2 lr (stage 1 and the inversions shared: bench/toy_lr_sweep.py) and
the robust stage's own checkpoints; esd, the iterations (its periodic checkpoints) and lr; uce, the
erase scale and lambda. Every erase run and measurement is kept under --runs and reused, so the
script resumes; phases train (a, b, c: run them side by side), measure and report:

    python bench/toy_frontier.py --phase a & python bench/toy_frontier.py --phase c &
    python bench/toy_frontier.py --phase measure --until 08:50
    python bench/toy_frontier.py --phase report      # table (markdown) + frontier.png
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

CONCEPT = "star"
RARE_BELOW = 10.0  # % of the target's captions
UCE_SCALES = (1.0, 0.5, 2.0, 4.0)
MATCHED = 10.0  # the target rate at which methods are compared
# ReCARE's runs are named by their training-image count (--num-images). The comparison was first
# measured with the toy's default of that day, 64 images; those runs and measurements keep their
# first names, which bench/toy_defaults_sweep.py reuses as its seeds' own runs.
FIRST_IMAGES = 64


def recare_settings(variant: str, images: int) -> dict:
    """The erase settings of a ReCARE variant: "exact" or "p10" (`--prefix-steps 10`)."""
    return {"method": "recare", "num_images": images} | ({"prefix_steps": 10} if variant == "p10" else {})


def recare_run(variant: str, seed: int, images: int) -> str:
    return f"{'recare' if images == FIRST_IMAGES else f'img{images}'}-{variant}-s{seed}"


def uce_careset_run(scale: float, images: int) -> str:
    """UCE with the CARE set of the ReCARE default trained with `images` images."""
    return f"{'' if images == FIRST_IMAGES else f'img{images}-'}uce-careset-s{scale:g}"


def measurements_dir(runs: Path, images: int | None) -> Path:
    """Where a model's measurement lives: the models that no training image reaches (base, esd, plain
    uce: `images` None) share the first one, whatever the image count being compared."""
    return runs / ("measurements" if images in (None, FIRST_IMAGES) else f"measurements-img{images}")


class SnapshotReporter:
    """Wraps a Reporter; copies the trained weights of every periodic checkpoint of `stage`."""

    def __init__(self, inner, run_dir: Path, stage: str):
        self.inner, self.run_dir, self.stage = inner, run_dir, stage

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def event(self, kind, **data):
        self.inner.event(kind, **data)
        if kind == "checkpoint" and data.get("stage") == self.stage:
            from safetensors.torch import load_file, save_file

            from recare_cli.erase.loop import CHECKPOINT

            saved = load_file(str(self.run_dir / CHECKPOINT))  # tensors only: checkpoints hold no pickle
            params = {k[len("param/"):]: v for k, v in saved.items() if k.startswith("param/")}
            out = self.run_dir / "snapshots"
            out.mkdir(exist_ok=True)
            save_file(params, str(out / f"{self.stage}-{data['step']}.safetensors"))


def finished(run_dir: Path) -> bool:
    path = run_dir / "recare-run.json"
    return path.is_file() and json.loads(path.read_text()).get("status") == "complete"


def train(name: str, settings: dict, runs: Path, reporter, snapshot_stage: str | None = None,
          checkpoint_every: int = 100, robust_from: str | None = None, robust_lr: float | None = None,
          stage1_from: str | None = None):
    from recare_cli.erase.run import EraseRequest, run_erase
    from recare_cli.models import Runtime
    from recare_cli.presets import with_model_defaults

    run_dir = runs / name
    if finished(run_dir):
        return run_dir
    runtime = Runtime("toy", device="cpu")
    import toy_lr_sweep

    if robust_from is not None:
        @dataclass
        class Ref:
            run_dir: Path
            stages: dict = field(default_factory=dict)

        ref_dir = runs / robust_from
        ref = Ref(ref_dir, json.loads((ref_dir / "recare-run.json").read_text())["stages"])
        from dataclasses import replace
        request = toy_lr_sweep.robust_only_request(ref, robust_lr, runs)
        if request.output_dir != run_dir:
            if run_dir.exists():
                shutil.rmtree(run_dir)
            request.output_dir.rename(run_dir)
            request = replace(request, output_dir=run_dir)
        request = replace(request, checkpoint_every=checkpoint_every)
    else:
        request = with_model_defaults(EraseRequest(concepts=[CONCEPT], output_dir=run_dir, checkpoint_every=checkpoint_every,
                                                   **settings), "toy", set(settings))
        if stage1_from is not None and not run_dir.exists():  # the first erase reads no image or CARE set
            toy_lr_sweep.seed_run_dir(request, runs / stage1_from, runtime, ["erase-0"])
    wrapped = SnapshotReporter(reporter, run_dir, snapshot_stage) if snapshot_stage else reporter
    started = time.perf_counter()
    run_erase(request, runtime, wrapped)
    reporter.info(f"trained {name} in {time.perf_counter() - started:.0f} s")
    return run_dir


# --- prompts: derived from the toy world's captions --------------------------------------------

def context_frequencies(concept: str, n: int = 40_000, seed: int = 0) -> dict[str, float]:
    """% of the captions naming `concept` that also name each colour, background and style."""
    import numpy as np

    from recare_cli.toy import world

    rng = np.random.default_rng(seed)
    words = list(world.COLOURS) + list(world.BACKGROUNDS) + ["stripes"]
    named, counts = 0, dict.fromkeys(words, 0)
    for _ in range(n):
        caption = world.caption(world.sample_scene(rng), rng)
        present = set(caption.replace(",", " ").split())
        if concept in present:
            named += 1
            for word in words:
                counts[word] += word in present
    return {word: 100.0 * c / named for word, c in counts.items()}


def with_context(concept: str, word: str, prefix: str = "") -> str:
    """A prompt for `concept` in one context word, phrased as the toy captions phrase it."""
    from recare_cli.toy import world

    if word in world.COLOURS:
        return f"{prefix}a {word} {concept}"
    if word in world.BACKGROUNDS:
        return f"{prefix}a {concept} {world.PREPOSITIONS[word][1]}"
    return f"{prefix}a {concept} in the style of {word}"


def target_prompts(concept: str, frequencies: dict[str, float]) -> dict[str, list[str]]:
    """common: one prompt per context word in >= 10% of the concept's captions; rare: each rarer
    word alone and with two common ones. None is a training prompt ("a star")."""
    from recare_cli.toy import world

    common = [w for w, f in frequencies.items() if f >= RARE_BELOW]
    rare = [w for w, f in frequencies.items() if f < RARE_BELOW]
    colours = [w for w in common if w in world.COLOURS]
    prompts = {"common": [with_context(concept, w, "a picture of " if i % 2 else "") for i, w in enumerate(common)],
               "rare": []}
    for word in rare:
        prompts["rare"] += [with_context(concept, word), with_context(concept, word, "a photo of ")]
        if word in world.BACKGROUNDS:
            prompts["rare"] += [f"a {c} {concept} {world.PREPOSITIONS[word][0]}" for c in colours[:2]]
    return prompts


def own_prompts(word: str, kind: str) -> list[str]:
    """Two prompts that name `word` and not the target (bench/toy_quality.py's, first two)."""
    import toy_quality

    prompts = toy_quality.concept_prompts(word, kind)
    return prompts[:2] if kind != "background" else [prompts[0], prompts[2]]


def plan_prompts(concept: str, care: list[str], frequencies: dict[str, float]) -> list[tuple[str, str, str, str]]:
    """(group, concept measured, head, prompt) for every image prompt of a measurement."""
    from recare_cli.metrics.toy import concept_heads

    heads = concept_heads()
    rows = []
    targets = target_prompts(concept, frequencies)
    for group, prompts in targets.items():
        rows += [(f"target-{group}", concept, heads[concept], p) for p in prompts]
    for word in heads:
        if word == concept:
            continue
        group = "CARE" if word in care else "unrelated"
        rows += [(group, word, heads[word], p) for p in own_prompts(word, heads[word])]
        if heads[word] != "shape":  # with the target word: the target prompts that name this word
            rows += [(f"{group}+target", word, heads[word], p)
                     for p in targets["common"] + targets["rare"] if word in p.replace(",", " ").split()]
    return rows


# --- measuring -------------------------------------------------------------------------------

def unet_state(model: dict, base_state: dict) -> dict:
    from safetensors.torch import load_file

    if model.get("snapshot"):
        return base_state | load_file(str(model["snapshot"]))
    if model.get("run") is None:
        return base_state
    return load_file(str(Path(model["run"]) / "unet.safetensors"))


def set_tokens(pipe, tokens_file: Path) -> list[str]:
    """Write a run's adversarial tokens into the pipeline (overwriting same-named rows of another run)."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file

    from recare_cli.learned_tokens import add_learned_tokens

    add_learned_tokens(pipe, tokens_file)
    table = pipe.text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        for name, row in load_file(str(tokens_file)).items():
            table[pipe.tokenizer.convert_tokens_to_ids(name)] = row.reshape(-1).to(table.dtype)
    with safe_open(str(tokens_file), framework="pt") as handle:
        return json.loads(handle.metadata()["tokens"])


def measure(pipe, classifier, rows, tokens: list[str], samples: int, steps: int, guidance: float) -> dict:
    """prompt -> {head: % of its images the classifier labels with the measured concept}."""
    import toy_quality

    from recare_cli.toy.classifier import predict

    rows = rows + [("adversarial", CONCEPT, "shape", p) for p in toy_quality.adversarial_prompts(tokens)]
    prompts = list(dict.fromkeys(r[3] for r in rows))
    labels = predict(classifier, toy_quality.generate(pipe, prompts, samples, steps, guidance))
    rates = []
    for group, word, head, prompt in rows:
        i = prompts.index(prompt)
        seen = labels[head][i * samples:(i + 1) * samples]
        rates.append({"group": group, "concept": word, "prompt": prompt,
                      "rate": 100.0 * sum(label == word for label in seen) / samples})
    return {"rates": rates}


# --- the models measured -------------------------------------------------------------------------

def models(runs: Path, images: int) -> list[dict]:
    """Every model of the comparison, most important first: method, setting, where its UNet is.

    `run`: an erase run directory (its unet.safetensors); `snapshot`: trained weights saved at a
    periodic checkpoint of that run (the base UNet plus those weights); `tokens`: the run whose
    adversarial tokens are measured (ESD and UCE learn none: the ReCARE default's); `images`: the
    training-image count that reaches the model (None: none does).
    """
    p10, exact = runs / recare_run("p10", 42, images), runs / recare_run("exact", 42, images)
    out = [{"name": "base", "method": "base", "setting": "-", "run": None, "images": None}]

    def add(name, method, setting, run, default=False, snapshot=None, tokens=p10, seed=42):
        reads_images = method.startswith(("recare", "uce --preserve"))
        out.append({"name": name, "method": method, "setting": setting, "run": run, "snapshot": snapshot,
                    "default": default, "tokens": tokens, "seed": seed, "images": images if reads_images else None})

    # In the order measured when time is short: defaults, then the settings that bracket 10%.
    add("recare-p10", "recare --prefix-steps 10", "stage-2 lr 1e-4", p10, default=True)
    add("esd", "esd", "lr 1e-4, 300 it.", runs / "esd-s42", default=True)
    add("uce", "uce", "scale 1, lam 0.5", runs / "uce-s1", default=True)
    add("uce-careset", "uce --preserve careset", "scale 1, lam 0.5", runs / uce_careset_run(1, images), default=True)
    add("recare-exact", "recare (exact)", "stage-2 lr 1e-4", exact, default=True, tokens=exact)
    for scale in (4.0, 2.0):
        add(f"uce-s{scale:g}", "uce", f"scale {scale:g}", runs / f"uce-s{scale:g}")
        add(f"uce-careset-s{scale:g}", "uce --preserve careset", f"scale {scale:g}", runs / uce_careset_run(scale, images))
    add("esd-it150", "esd", "lr 1e-4, 150 it.", runs / "esd-s42", snapshot=runs / "esd-s42" / "snapshots" / "esd-150.safetensors")
    for lr in (2e-4, 5e-5):
        add(f"recare-p10-lr{lr:g}", "recare --prefix-steps 10", f"stage-2 lr {lr:g}", runs / f"{p10.name}-lr{lr:g}")
    for step in (75, 225):
        add(f"esd-it{step}", "esd", f"lr 1e-4, {step} it.", runs / "esd-s42",
            snapshot=runs / "esd-s42" / "snapshots" / f"esd-{step}.safetensors")
    add("recare-p10-lr0.0003", "recare --prefix-steps 10", "stage-2 lr 0.0003", runs / f"{p10.name}-lr0.0003")
    add("uce-s0.5", "uce", "scale 0.5", runs / "uce-s0.5")
    add("uce-careset-s0.5", "uce --preserve careset", "scale 0.5", runs / uce_careset_run(0.5, images))
    add("uce-lam0.1", "uce", "scale 1, lam 0.1", runs / "uce-lam0.1")
    for step in (100, 200):
        add(f"recare-exact-it{step}", "recare (exact)", f"lr 1e-4, {step} robust it.", exact, tokens=exact,
            snapshot=exact / "snapshots" / f"robust-{step}.safetensors")
    add("recare-exact-lr0.0002", "recare (exact)", "stage-2 lr 2e-4", runs / f"{exact.name}-lr0.0002", tokens=exact)
    add("esd-lr0.0003", "esd", "lr 3e-4, 300 it.", runs / "esd-s42-lr0.0003")
    p10_s43, exact_s43 = runs / recare_run("p10", 43, images), runs / recare_run("exact", 43, images)
    add("recare-p10-s43", "recare --prefix-steps 10", "stage-2 lr 1e-4, seed 43", p10_s43, default=True, tokens=p10_s43, seed=43)
    add("esd-s43", "esd", "lr 1e-4, 300 it., seed 43", runs / "esd-s43", default=True, seed=43)
    add("recare-exact-s43", "recare (exact)", "stage-2 lr 1e-4, seed 43", exact_s43, default=True, tokens=exact_s43, seed=43)
    return out


def available(model: dict) -> bool:
    if model["run"] is None:
        return True
    if model.get("snapshot"):
        return Path(model["snapshot"]).is_file()
    return finished(Path(model["run"]))


def seconds(model: dict) -> float | None:
    """Training time from the manifests: every stage of the run (and of the run it shares stage 1 with)."""
    if model["run"] is None:
        return None
    stages = json.loads((Path(model["run"]) / "recare-run.json").read_text()).get("stages", {})
    total = sum(v.get("seconds", 0) for v in stages.values())
    return round(total, 1) if total else None  # a snapshot of a run that has not finished a stage


def edit_uce(runs: Path, images: int, reporter) -> None:
    """The UCE models: seconds each; `--preserve careset` reads the ReCARE default's CARE set."""

    careset = runs / recare_run("p10", 42, images) / "careset.json"
    for scale in UCE_SCALES:
        train(f"uce-s{scale:g}", {"method": "uce", "uce_erase_scale": scale}, runs, reporter)
        if careset.is_file():
            train(uce_careset_run(scale, images), {"method": "uce", "uce_erase_scale": scale, "preserve": ["careset"],
                                                    "careset": careset}, runs, reporter)
    train("uce-lam0.1", {"method": "uce", "uce_lamb": 0.1}, runs, reporter)


# --- the summary ---------------------------------------------------------------------------------

def summarise(entry: dict, base: dict, care: list[str]) -> dict:
    """The figures of one model, with `care` as the CARE set: every concept in it counts as CARE,
    whatever CARE set the measurement was labelled with (ESD, UCE and the base model are measured
    once, for every image count's comparison)."""
    def regrouped(row):
        kind, plus, rest = row["group"].partition("+")
        if kind in ("CARE", "unrelated"):
            kind = "CARE" if row["concept"] in care else "unrelated"
        return dict(row, group=kind + plus + rest)

    rates, base_rates = [regrouped(r) for r in entry["rates"]], base["rates"]

    def mean_rate(group):
        values = [r["rate"] for r in rates if r["group"] == group]
        return sum(values) / len(values) if values else None

    def all_kept(groups, concept=None):
        """[kept % (sum of rates over sum of base rates), lowest per-prompt kept %]"""
        pairs = [(r["rate"], b["rate"]) for r, b in zip(rates, base_rates)
                 if r["group"] in groups and (concept is None or r["concept"] == concept) and b["rate"] > 0]
        if not pairs:
            return None
        return [100.0 * sum(r for r, _ in pairs) / sum(b for _, b in pairs), min(100.0 * r / b for r, b in pairs)]

    return {
        "target_common": mean_rate("target-common"), "target_rare": mean_rate("target-rare"),
        "adversarial": mean_rate("adversarial"),
        "care_kept": all_kept(("CARE", "CARE+target")),
        "care_kept_without_target": all_kept(("CARE",)), "care_kept_with_target": all_kept(("CARE+target",)),
        "care_per_concept": {w: all_kept(("CARE", "CARE+target"), w) for w in care},
        "unrelated_kept": all_kept(("unrelated",)), "unrelated_kept_with_target": all_kept(("unrelated+target",)),
        "night_without_target": all_kept(("CARE", "unrelated"), "night"),
        "night_with_target": all_kept(("CARE+target", "unrelated+target"), "night"),
    }


def target(point: dict) -> float:
    """A model's target rate: the higher of its common- and rare-context rates (the goal needs both low)."""
    return max(point["target_common"], point["target_rare"])


def at_matched_erasure(points: list[dict], key: str, level: float = 10.0):
    """`key` at target rate `level` on the method's upper envelope, None if no setting reaches it.

    The envelope is the settings no other setting beats on both counts (a target rate as low and a
    `key` as high), joined by straight lines: the most a method keeps at each erasure among the
    settings tried, whatever order they were tried in. At or under its lowest-rate setting's level,
    the method keeps the most of any setting at or under the level.
    """
    measured = [(target(p), p[key][0]) for p in points if p[key] is not None]
    envelope = sorted((t, k) for t, k in measured
                      if not any(t2 <= t and k2 >= k and (t2, k2) != (t, k) for t2, k2 in measured))
    if not envelope or envelope[0][0] > level:
        return None
    for (t_low, k_low), (t_high, k_high) in zip(envelope, envelope[1:]):
        if t_low <= level < t_high:
            return k_low + (level - t_low) / (t_high - t_low) * (k_high - k_low)
    return envelope[-1][1]


@dataclass
class Measuring:
    """What every measurement shares: the toy pipeline, its base UNet, the classifier, the prompts' contexts."""

    pipe: object
    base_state: dict
    classifier: object
    frequencies: dict

    @classmethod
    def load(cls) -> "Measuring":
        from recare_cli.models import Runtime
        from recare_cli.toy.package import load_classifier

        pipe, _, _ = Runtime("toy", device="cpu").pipeline()
        return cls(pipe, {k: v.clone() for k, v in pipe.unet.state_dict().items()}, load_classifier(),
                   context_frequencies(CONCEPT))

    def measure(self, model: dict, care_set: list[str], tokens_file: Path | None, args, out: Path, **extra) -> None:
        """Measure `model` (its UNet, and its adversarial tokens when given) and write out/<name>.json."""
        import torch

        started = time.perf_counter()
        self.pipe.unet.load_state_dict(unet_state(model, self.base_state))
        tokens = set_tokens(self.pipe, tokens_file) if tokens_file is not None else []
        torch.manual_seed(0)
        entry = measure(self.pipe, self.classifier, plan_prompts(CONCEPT, care_set, self.frequencies), tokens,
                        args.samples, args.steps, args.guidance)
        entry |= {"model": {k: str(v) if isinstance(v, Path) else v for k, v in model.items()}, **extra,
                  "measure_seconds": round(time.perf_counter() - started, 1),
                  "samples": args.samples, "steps": args.steps, "guidance": args.guidance}
        (out / f"{model['name']}.json").write_text(json.dumps(entry, indent=1) + "\n")


def past(until: str | None) -> bool:
    """True once --until (HH:MM, UTC) has passed."""
    import datetime

    return until is not None and datetime.datetime.utcnow().strftime("%H:%M") >= until


def wait_or_stop(until: str | None) -> bool:
    """False once --until has passed or without one; else wait a minute for more runs, True."""
    if until is None or past(until):
        return False
    time.sleep(60)
    return True


def measure_all(args, reporter) -> None:
    """Measure every available model not measured yet, until --until (HH:MM, UTC) or all are done."""
    measuring = Measuring.load()
    while True:
        edit_uce(args.runs, args.num_images, reporter)
        care = care_words(args.runs, args.num_images)
        if past(args.until):
            return
        # One model at a time, the most important one available and not taken by another measuring
        # process (a lock file), so that runs finishing meanwhile are measured in order.
        model = next((m for m in models(args.runs, args.num_images)
                      if care is not None and available(m) and claim(measurements_dir(args.runs, m["images"]), m["name"])), None)
        if model is None:
            if not wait_or_stop(args.until):
                return
            continue
        reporter.info(f"measure {model['name']}")
        # The adversarial tokens' prompts only for the models that learned them (and base): time is short.
        tokens_file = Path(model.get("tokens") or args.runs / recare_run("p10", 42, args.num_images)) / "tokens.safetensors"
        wants_tokens = model["method"] in ("base",) or model["method"].startswith("recare")
        measuring.measure(model, care, tokens_file if wants_tokens and tokens_file.is_file() else None, args,
                          measurements_dir(args.runs, model["images"]),
                          train_seconds=seconds(model))


def claim(out: Path, name: str) -> bool:
    """True for the one process that gets to measure `name` (not measured, not being measured).

    The lock file holds the measuring process's id; a lock whose process is gone (killed) is stale.
    """
    import os

    out.mkdir(exist_ok=True)
    if (out / f"{name}.json").is_file():
        return False
    lock = out / f"{name}.lock"
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        try:
            os.kill(int(lock.read_text() or 0), 0)
            return False
        except (ProcessLookupError, ValueError):
            lock.unlink(missing_ok=True)
            return claim(out, name)
    with os.fdopen(fd, "w") as handle:
        handle.write(str(os.getpid()))
    return True


def care_words_of(run: Path) -> list[str] | None:
    import toy_quality

    return toy_quality.care_set_words(run) if (run / "careset.json").is_file() else None


def care_words(runs: Path, images: int) -> list[str] | None:
    return care_words_of(runs / recare_run("p10", 42, images))


def report(args) -> str:
    """The markdown table at matched erasure and per model, and the PNG."""
    care = care_words(args.runs, args.num_images)
    measured = {m["name"]: (m, json.loads(path.read_text())) for m in models(args.runs, args.num_images)
                if (path := measurements_dir(args.runs, m["images"]) / f"{m['name']}.json").is_file()}
    base = measured.pop("base")[1]
    points = {}
    for name, (model, entry) in measured.items():
        points[name] = {"model": model, "train_seconds": entry["train_seconds"], **summarise(entry, base, care)}

    def pct(value):
        return "–" if value is None else f"{value:.0f}%"

    def pair(value):
        return "–" if value is None else f"{value[0]:.0f}% (min {value[1]:.0f}%)"

    frequencies = context_frequencies(CONCEPT)
    lines = [f"ReCARE trained on {args.num_images} images. CARE set (the ReCARE default's, seed 42): {', '.join(care)}. Context words of `{CONCEPT}` in the toy captions "
             "(% of its captions): " + ", ".join(f"{w} {f:.1f}" for w, f in frequencies.items()) + ".", "",
             f"At matched erasure (target rate <= {MATCHED:.0f}% on common and on rare contexts, interpolated along "
             "each method's upper envelope: the most any of its seed-42 settings keeps at that erasure):", "", "| method | CARE kept | unrelated kept |", "|---|---|---|"]
    methods = list(dict.fromkeys(p["model"]["method"] for p in points.values()))
    for method in methods:
        curve = [p for p in points.values() if p["model"]["method"] == method and p["model"].get("seed", 42) == 42]
        care_at = at_matched_erasure(curve, "care_kept", MATCHED)
        unrelated_at = at_matched_erasure(curve, "unrelated_kept", MATCHED)
        lines.append(f"| {method} | " + (f"{care_at:.0f}% | {unrelated_at:.0f}%" if care_at is not None
                                         else f"never reaches {MATCHED:.0f}% | –") + " |")
    lines += ["", "Every model (classifier; kept = sum of rates over the base's, min = the lowest single prompt):", "",
              "| method | setting | target common | target rare | CARE kept | CARE kept, with target word | "
              "unrelated kept | night (own) | night (with target) | adversarial | training |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    base_rates = summarise(base, base, care)
    lines.append(f"| base | – | {pct(base_rates['target_common'])} | {pct(base_rates['target_rare'])} | – | – | – | – | – | "
                 f"{pct(base_rates['adversarial'])} | – |")
    for name, p in points.items():
        m = p["model"]
        label = f"**{m['setting']}**" if m.get("default") else m["setting"]
        train_time = "–" if p["train_seconds"] is None else f"{p['train_seconds']:.0f} s" + (" (whole run)" if m.get("snapshot") else "")
        lines.append(f"| {m['method']} | {label} | {pct(p['target_common'])} | {pct(p['target_rare'])} | "
                     f"{pair(p['care_kept'])} | {pair(p['care_kept_with_target'])} | {pair(p['unrelated_kept'])} | "
                     f"{pair(p['night_without_target'])} | {pair(p['night_with_target'])} | {pct(p['adversarial'])} | "
                     f"{train_time} |")
    lines += ["", "Per CARE concept (kept, min): " + "; ".join(
        f"{name}: " + ", ".join(f"{w} {pair(v)}" for w, v in p["care_per_concept"].items())
        for name, p in points.items() if p["model"].get("default"))]
    plot(points, args.png, args.num_images)
    (args.runs / "frontier.json").write_text(json.dumps({"base": base_rates, "points": points}, indent=1, default=str))
    return "\n".join(lines)


def plot(points: dict, path: Path, images: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), sharex=True)
    for method in dict.fromkeys(p["model"]["method"] for p in points.values()):
        # The curve is seed 42's settings; other seeds' defaults are stars off the line.
        ours = [p for p in points.values() if p["model"]["method"] == method]
        curve = sorted((p for p in ours if p["model"].get("seed", 42) == 42), key=target)
        x = [target(p) for p in curve]
        for ax, key in zip(axes, ("care_kept", "unrelated_kept")):
            line, = ax.plot(x, [p[key][0] for p in curve], "o-", label=method, alpha=0.8)
            defaults = [(target(p), p[key][0]) for p in ours if p["model"].get("default")]
            if defaults:
                ax.plot(*zip(*defaults), "*", markersize=14, color=line.get_color(), markeredgecolor="black")
    for ax, title in zip(axes, ("CARE concepts kept", "unrelated concepts kept")):
        ax.axvline(MATCHED, color="grey", linestyle=":", linewidth=1)
        ax.set_xlabel(f"{CONCEPT} rate, % (higher of common, rare contexts)")
        ax.set_xlim(-3, 103)
        ax.set_ylim(0, 115)
        ax.set_ylabel("% of the base model's rate")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Toy world: erasing star, ReCARE trained on {images} images "
                 "(lines: seed 42 settings; stars: defaults, seeds 42 and 43)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def train_recare(variant: str, stage2_lrs: tuple, runs: Path, images: int, reporter) -> None:
    """A ReCARE variant's default (seed 42, robust checkpoints kept), other stage-2 rates sharing its
    stage 1, and seed 43. With another image count than the first, the first erase, which reads no
    image, is taken from the first count's run of the seed where there is one."""
    def first_erase(seed):
        first = recare_run(variant, seed, FIRST_IMAGES)
        return first if images != FIRST_IMAGES and finished(runs / first) else None

    own = recare_run(variant, 42, images)
    train(own, recare_settings(variant, images), runs, reporter, snapshot_stage="robust", stage1_from=first_erase(42))
    for lr in stage2_lrs:
        train(f"{own}-lr{lr:g}", {}, runs, reporter, robust_from=own, robust_lr=lr)
    train(recare_run(variant, 43, images), recare_settings(variant, images) | {"seed": 43}, runs, reporter,
          stage1_from=first_erase(43))


def main(argv=None) -> int:
    from recare_cli.presets import MODEL_DEFAULTS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, default=Path("bench-runs/frontier"), help="erase runs and measurements")
    parser.add_argument("--phase", choices=("a", "b", "c", "measure", "report"), required=True)
    parser.add_argument("--samples", type=int, default=4, help="images per prompt")
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps per image")
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--until", help="measure: stop starting new measurements at this UTC time (HH:MM)")
    parser.add_argument("--num-images", type=int, default=MODEL_DEFAULTS["toy"]["num_images"],
                        help="ReCARE's training images (default: the toy's default)")
    parser.add_argument("--png", type=Path, default=Path("docs/frontier.png"))
    args = parser.parse_args(argv)
    import torch

    from recare_cli.output import HUMAN, Reporter

    torch.set_num_threads(1)
    reporter = Reporter(HUMAN)
    args.runs.mkdir(parents=True, exist_ok=True)
    if args.phase == "a":
        train_recare("p10", (5e-5, 2e-4, 3e-4), args.runs, args.num_images, reporter)
    if args.phase == "c":
        train("esd-s42", {"method": "esd"}, args.runs, reporter, snapshot_stage="esd", checkpoint_every=75)
        train("esd-s43", {"method": "esd", "seed": 43}, args.runs, reporter)
        train("esd-s42-lr0.0003", {"method": "esd", "stage1_lr": 3e-4}, args.runs, reporter)
    if args.phase == "b":
        train_recare("exact", (2e-4,), args.runs, args.num_images, reporter)
    if args.phase == "measure":
        measure_all(args, reporter)
    if args.phase == "report":
        print(report(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
