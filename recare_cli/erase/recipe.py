"""`recare erase --recipe FILE.toml`: several erase runs from one file, one after another (or side by side).

    model = "tiny-random"        # top level: settings every entry shares
    method = "esd"
    iterations = 10

    [[concept]]                  # one erase run per table
    concept = "nudity"

    [[concept]]
    concept = ["tench", "church"]   # a list is erased together, in one run
    type = "object"
    output-dir = "runs/objects"

Keys are the `recare erase` flags without their dashes (`output-dir` or `output_dir`), plus model,
device and dtype. Settings, weakest first: erase's defaults and the config file, the recipe's top
level, flags typed on the command line, the entry's own keys. Relative paths in the recipe are
relative to the recipe file. Every entry runs through its method's `run`, exactly as
`recare erase --concept` does, in its own resumable run directory. Under `accelerate launch` the
processes share the entries out, and the main one reports them all (docs/multi-gpu.md).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, fields, replace
from difflib import get_close_matches
from pathlib import Path
from typing import get_args, get_type_hints

from rich.markup import escape

from recare_cli.config import tomllib
from recare_cli.erase.request import METHODS, EraseRequest, check_request
from recare_cli.erase.run import EraseResult
from recare_cli.errors import Interrupted, RecareError, UsageError
from recare_cli.models import Runtime
from recare_cli.output import QUIET_REPORTER, Reporter
from recare_cli.presets import with_model_defaults
from recare_cli.processes import (
    alone, broadcast_from_main, gather_to_main, launched_world, own_device, process_group, waiting_group,
)

RUNTIME_KEYS = ("model", "device", "dtype")
DONE, REUSED, FAILED = "done", "reused", "failed"
TYPE_WORDS = {int: "a whole number", float: "a number", bool: "true or false", str: "a quoted string",
              Path: "a quoted path"}
FORMAT_HINT = 'one [[concept]] table per run, each with concept = "NAME"; see `recare erase --help`'


def _keys() -> dict[str, str]:
    """Recipe key, spelled as its flag -> the EraseRequest or Runtime field it sets."""
    renamed = {"concepts": "concept", "concept_type": "type"}
    keys = {renamed.get(f.name, f.name).replace("_", "-"): f.name for f in fields(EraseRequest) if f.name != "command"}
    return keys | {key: key for key in RUNTIME_KEYS}


KEYS = _keys()
FIELD_TYPES = get_type_hints(EraseRequest) | {key: str for key in RUNTIME_KEYS}


@dataclass
class Recipe:
    path: Path
    defaults: dict  # field -> value, from the top level
    entries: list[dict]  # field -> value, one per [[concept]] table

    def where(self, index: int) -> str:
        return f"recipe '{self.path}', [[concept]] #{index}"


@dataclass
class Entry:
    index: int
    request: EraseRequest
    runtime: Runtime

    @property
    def label(self) -> str:
        return f"#{self.index} ({', '.join(self.request.concepts)})"


@dataclass
class Outcome:
    entry: Entry
    status: str
    seconds: float
    result: EraseResult | None = None
    error: str | None = None

    def row(self) -> dict:
        result = self.result
        return {"entry": self.entry.index, "concepts": self.entry.request.concepts,
                "method": self.entry.request.method, "status": self.status,
                "run_dir": str(result.run_dir) if result else None, "cache_name": result.cache_name if result else None,
                "unet": str(result.unet_path) if result else None, "tokens": result.tokens if result else [],
                "seconds": self.seconds, "error": self.error}


# reading and checking --------------------------------------------------------------------------

def read_recipe(path: Path) -> Recipe:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot read recipe '{path}': {exc.strerror or exc}",
                         hint="--recipe takes the path of a TOML file") from None
    except UnicodeDecodeError:
        raise UsageError(f"recipe '{path}' is not UTF-8 text", hint="--recipe takes a TOML file") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"recipe '{path}' is not valid TOML: {exc}", hint=FORMAT_HINT) from None
    return parse_recipe(data, Path(path))


def parse_recipe(data: dict, path: Path) -> Recipe:
    tables = data.get("concept")
    if not isinstance(tables, list) or not tables or not all(isinstance(t, dict) for t in tables):
        raise UsageError(f"recipe '{path}' has no [[concept]] tables", hint=FORMAT_HINT)
    recipe = Recipe(path, {}, [])
    top = {k: v for k, v in data.items() if k != "concept"}
    recipe.defaults = _settings(top, f"recipe '{path}'", path.parent, set(KEYS) - {"concept"})
    for index, table in enumerate(tables, 1):
        if "concept" not in table:
            raise UsageError(f"{recipe.where(index)} has no 'concept'",
                             hint='add concept = "NAME" (or a list of names erased together)')
        recipe.entries.append(_settings(table, recipe.where(index), path.parent, set(KEYS)))
    return recipe


def _settings(table: dict, where: str, base: Path, allowed: set[str]) -> dict:
    settings = {}
    for key, value in table.items():
        name = key.replace("_", "-")
        if name not in allowed:
            guess = get_close_matches(name, allowed, n=1)
            did_you_mean = f"did you mean '{guess[0]}'? " if guess else ""
            raise UsageError(f"{where}: unknown key '{key}'",
                             hint=f"{did_you_mean}allowed: {', '.join(sorted(allowed))}")
        field = KEYS[name]
        if field in settings:
            raise UsageError(f"{where}: '{name}' is set twice", hint="keep one of its spellings")
        is_list = FIELD_TYPES[field] == list[str]
        settings[field] = _names(name, value, where) if is_list else _convert(name, value, field, base, where)
    return settings


def _names(name: str, value, where: str) -> list[str]:
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise UsageError(f"{where}: '{name}' must be a name or a list of names (got {value!r})",
                         hint=f'e.g. {name} = "nudity"')
    return names


def _convert(name: str, value, field: str, base: Path, where: str):
    kind = next(k for k in get_args(FIELD_TYPES[field]) or (FIELD_TYPES[field],) if k is not type(None))
    # TOML already types its values; only a whole number may stand for a float.
    if kind is float and type(value) in (int, float):
        return float(value)
    if kind is Path and isinstance(value, str):
        return base / Path(value).expanduser()
    if type(value) is kind:
        return value
    raise UsageError(f"{where}: '{name}' must be {TYPE_WORDS[kind]} (got {value!r})",
                     hint="TOML writes numbers and true/false bare, text in quotes")


def plan_entries(recipe: Recipe, base: EraseRequest, runtime: Runtime, explicit: set[str],
                 configured: set[str] = frozenset()) -> list[Entry]:
    """Every entry's request and runtime, all checked, so that a bad entry stops the recipe before any runs.

    `base` and `runtime` hold the command line's values; `explicit` names those typed there, which
    win over the recipe's top level but not over an entry's own keys. Settings no one chose take
    the entry's model's defaults (presets.MODEL_DEFAULTS); `configured` names the settings the
    config file gives, which also win over those.
    """
    given = {f.name: getattr(base, f.name) for f in fields(base) if f.name in explicit}
    given |= {key: getattr(runtime, key) for key in RUNTIME_KEYS if key in explicit}
    entries = []
    for index, own in enumerate(recipe.entries, 1):
        settings = {**recipe.defaults, **given, **own}
        chosen = explicit | configured | set(settings)
        runtime_settings = {key: settings.pop(key) for key in RUNTIME_KEYS if key in settings}
        entry_runtime = replace(runtime, **runtime_settings)
        request = with_model_defaults(replace(base, **settings), entry_runtime.model, chosen)
        entry = Entry(index, request, entry_runtime)
        try:
            _check(entry)
        except RecareError as exc:
            raise type(exc)(f"{recipe.where(index)}: {exc.message}", exc.hint) from None
        entries.append(entry)
    _check_output_dirs(recipe, entries)
    return entries


def _check(entry: Entry) -> None:
    from recare_cli.plugins import registry

    request = entry.request
    registry().method(request.method)
    if request.method in METHODS:  # a third-party method checks its own request when it runs
        check_request(request)
    entry.runtime.torch_dtype()  # checks --device and --dtype
    for name, path in (("images", request.images), ("careset", request.careset), ("care_vocab", request.care_vocab)):
        if path is not None and not Path(path).exists():
            raise UsageError(f"{name} '{path}' does not exist",
                             hint="paths in a recipe are relative to the recipe file")


def _check_output_dirs(recipe: Recipe, entries: list[Entry]) -> None:
    for later in entries:
        same = next((e for e in entries if e.index < later.index
                     and (e.request, e.runtime) == (later.request, later.runtime)), None)
        if same is not None:  # it would run once and then be "reused"
            raise UsageError(f"recipe '{recipe.path}': [[concept]] #{same.index} and #{later.index} are the same run",
                             hint="remove the duplicate entry")
    owners: dict[Path, int] = {}
    for entry in entries:
        if entry.request.output_dir is None:
            continue
        folder = Path(entry.request.output_dir).resolve()
        if folder in owners:
            raise UsageError(
                f"recipe '{recipe.path}': [[concept]] #{owners[folder]} and #{entry.index} both write to "
                f"'{entry.request.output_dir}'",
                hint="give each [[concept]] its own output-dir, or leave it out for runs/<concept>-<method>-<hash>")
        owners[folder] = entry.index


# running --------------------------------------------------------------------------------------

def run_recipe(recipe: Recipe, entries: list[Entry], reporter: Reporter) -> list[Outcome]:
    """Run the entries in order; a failed one is reported and the next one runs.

    Under `accelerate launch` the processes share the entries out (see _run_spread) and only the
    main process reports, once all are done. Reports one result per entry and then a summary;
    raises RecareError at the end if any failed. Returns [] off the main process.
    """
    if launched_world() > 1:
        outcomes = _run_spread(entries, reporter)
        if outcomes is None:
            return []
        for outcome in outcomes:
            _report(outcome, len(entries), reporter)
    else:
        outcomes = []
        for entry in entries:
            outcomes.append(_run_entry(entry, reporter))
            _report(outcomes[-1], len(entries), reporter)
    counts = {status: sum(o.status == status for o in outcomes) for status in (DONE, REUSED, FAILED)}
    summary = {"recipe": str(recipe.path), "entries": len(outcomes), **counts,
               "seconds": round(sum(o.seconds for o in outcomes), 3)}
    reporter.result(summary, render=lambda console: console.print(_table(outcomes)))
    failed = [o.entry.label for o in outcomes if o.status == FAILED]
    if failed:
        raise RecareError(f"{len(failed)} of {len(outcomes)} recipe entries failed: {', '.join(failed)}",
                          hint="the others finished; fix those and rerun the recipe, which reuses finished runs")
    return outcomes


def _report(outcome: Outcome, total: int, reporter: Reporter) -> None:
    reporter.result(outcome.row(), render=lambda console: console.print(escape(
        f"[{outcome.entry.index}/{total}] {', '.join(outcome.entry.request.concepts)} "
        f"({outcome.entry.request.method}): {outcome.status} in {outcome.seconds:.1f} s"), highlight=False))


def _run_spread(entries: list[Entry], reporter: Reporter) -> list[Outcome] | None:
    """This process's share of the entries, one at a time on its own device; every outcome on the main process.

    A failed entry is an outcome like any other, so every process reaches the final gather. A
    process that dies instead (Ctrl-C, killed) makes `accelerate launch` stop the others.
    """
    runtime = next((e.runtime for e in entries if e.runtime.torch_device() != "cpu"), entries[0].runtime)
    rank, world, state = process_group(runtime)
    group = waiting_group()
    # One plan, made by the main process, so that no two processes can disagree on who runs what.
    shares = broadcast_from_main(share_out(entries, world) if rank == 0 else None, group)
    outcomes = []
    with alone():  # an entry's training images are its own process's work, not split again
        for position in shares[rank]:
            entry = entries[position]
            outcomes.append(_run_entry(replace(entry, runtime=own_device(entry.runtime, state)),
                                       reporter if rank == 0 else QUIET_REPORTER))
    gathered = gather_to_main(outcomes, group)
    return None if gathered is None else sorted(gathered, key=lambda o: o.entry.index)


def share_out(entries: list[Entry], world: int) -> list[list[int]]:
    """Positions of the entries each process runs, in recipe order.

    Entries that would write one run directory (the same settings twice) go to the same process,
    where the later one reuses the earlier's run instead of training it again beside it. Each
    such group goes to the process with the fewest entries so far.
    """
    groups: dict[object, list[int]] = {}
    for position, entry in enumerate(entries):
        groups.setdefault(_run_key(entry), []).append(position)
    shares: list[list[int]] = [[] for _ in range(world)]
    for positions in groups.values():
        min(shares, key=len).extend(positions)
    return [sorted(share) for share in shares]


def _run_key(entry: Entry):
    """The entry's run directory when recare can tell it in advance, else the entry itself."""
    from recare_cli.erase.run import planned_run_dir

    if entry.request.method not in METHODS:  # a third-party method chooses its own folders
        return entry.index
    try:
        return planned_run_dir(entry.request, entry.runtime).resolve()
    except Exception:  # noqa: BLE001 - the entry fails with this error when it runs, and says so there
        return entry.index


def _run_entry(entry: Entry, reporter: Reporter) -> Outcome:
    from recare_cli.plugins import registry

    started = time.perf_counter()
    try:
        result = registry().method(entry.request.method).run(entry.request, entry.runtime, reporter)
    except Interrupted:  # Ctrl-C stops the whole recipe, not just this entry
        raise
    except RecareError as exc:
        error = str(exc)
    except Exception as exc:  # noqa: BLE001 - one broken entry must not cost the entries after it
        error = f"unexpected {type(exc).__name__}: {exc}"
    else:
        reused = bool(result.stages) and all(stage.get("reused") for stage in result.stages.values())
        return Outcome(entry, REUSED if reused else DONE, _since(started), result)
    error = " ".join(error.split())
    reporter.warn(escape(f"[[concept]] {entry.label} failed: {error}; going on with the next"))
    return Outcome(entry, FAILED, _since(started), error=error)


def _since(started: float) -> float:
    return round(time.perf_counter() - started, 3)


def _table(outcomes: list[Outcome]):
    from rich.table import Table

    table = Table("#", "concept", "method", "status", "run dir", "cache name", "seconds")
    colours = {DONE: "green", REUSED: "cyan", FAILED: "red"}
    for o in outcomes:
        row = o.row()
        table.add_row(str(o.entry.index), escape(", ".join(row["concepts"])), escape(row["method"]),
                      f"[{colours[o.status]}]{o.status}[/]", escape(row["run_dir"] or "-"),
                      escape(row["cache_name"] or "-"), f"{o.seconds:.1f}")
    return table
