"""`recare erase --recipe`'s core without a model: reading the file, the requests it makes, the
checks before anything runs, sharing entries out, and the report of a run (through a plugin method)."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import time
from pathlib import Path

import pytest

from recare_cli.erase.recipe import (
    Entry, parse_recipe, plan_entries, read_recipe, run_recipe, share_out,
)
from recare_cli.erase.request import EraseRequest
from recare_cli.erase.run import EraseResult
from recare_cli.errors import Interrupted, RecareError, UsageError
from recare_cli.models import Runtime
from recare_cli.output import HUMAN, JSON, Reporter

FORMAT = '[[concept]] table per run, each with concept = "NAME"'
TYPES = "TOML writes numbers and true/false bare, text in quotes"


def refused(call, *args, **kwargs) -> UsageError:
    with pytest.raises(UsageError) as caught:
        call(*args, **kwargs)
    return caught.value


def one_entry(tmp_path, **keys) -> dict:
    return parse_recipe({"concept": [{"concept": "nudity", **keys}]}, tmp_path / "r.toml").entries[0]


# reading the file -------------------------------------------------------------------------------

def test_a_recipe_file_that_cannot_be_read_is_one_error(tmp_path):
    missing = tmp_path / "missing.toml"
    error = refused(read_recipe, missing)
    assert error.message == f"cannot read recipe '{missing}': No such file or directory"
    assert error.hint == "--recipe takes the path of a TOML file"
    assert refused(read_recipe, tmp_path).message == f"cannot read recipe '{tmp_path}': Is a directory"
    latin = tmp_path / "latin.toml"
    latin.write_bytes('[[concept]]\nconcept = "M\u00fcller"\n'.encode("latin-1"))
    error = refused(read_recipe, latin)
    assert (error.message, error.hint) == (f"recipe '{latin}' is not UTF-8 text", "--recipe takes a TOML file")
    broken = tmp_path / "broken.toml"
    broken.write_text('[[concept]]\nconcept = "nudity\n')
    error = refused(read_recipe, broken)
    assert error.message.startswith(f"recipe '{broken}' is not valid TOML: ") and FORMAT in error.hint


def test_a_recipe_reads_utf8_and_keeps_its_path(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text('method = "esd"\n[[concept]]\nconcept = "M\u00fcller"\n', encoding="utf-8")
    recipe = read_recipe(path)
    assert recipe.path == path and recipe.defaults == {"method": "esd"} and recipe.entries == [{"concepts": ["M\u00fcller"]}]


@pytest.mark.parametrize("data", [{}, {"concept": "nudity"}, {"concept": []}, {"concept": ["nudity"]},
                                  {"concept": [{"concept": "nudity"}, "tench"]}])
def test_a_recipe_without_concept_tables_is_refused(tmp_path, data):
    error = refused(parse_recipe, data, tmp_path / "r.toml")
    assert error.message == f"recipe '{tmp_path / 'r.toml'}' has no [[concept]] tables" and FORMAT in error.hint


def test_an_entry_without_a_concept_is_named_by_its_number(tmp_path):
    error = refused(parse_recipe, {"concept": [{"concept": "nudity"}, {"type": "object"}]}, tmp_path / "r.toml")
    assert error.message == f"recipe '{tmp_path / 'r.toml'}', [[concept]] #2 has no 'concept'"
    assert error.hint == 'add concept = "NAME" (or a list of names erased together)'


# keys and their values ----------------------------------------------------------------------------

def test_keys_are_the_flags_with_either_spelling(tmp_path):
    entry = one_entry(tmp_path, type="object", output_dir="out", **{"checkpoint-every": 5, "erase_from": "painting"},
                      preserve="careset", model="toy", device="cpu", dtype="fp32", iterations=3)
    assert entry == {"concepts": ["nudity"], "concept_type": "object", "output_dir": tmp_path / "out",
                     "checkpoint_every": 5, "erase_from": ["painting"], "preserve": ["careset"], "model": "toy",
                     "device": "cpu", "dtype": "fp32", "iterations": 3}
    assert type(entry["iterations"]) is int


def test_unknown_keys_suggest_the_nearest_and_list_the_allowed(tmp_path):
    path = tmp_path / "r.toml"
    error = refused(parse_recipe, {"concept": [{"concept": "a", "iteration": 3}]}, path)
    assert error.message == f"recipe '{path}', [[concept]] #1: unknown key 'iteration'"
    assert error.hint.startswith("did you mean 'iterations'? allowed: ")
    entry_keys = error.hint.split("allowed: ")[1].split(", ")
    assert entry_keys == sorted(entry_keys) and {"concept", "type", "output-dir", "model", "device", "dtype"} <= set(entry_keys)
    for not_a_key in ("command", "concepts", "concept-type", "concept_type"):
        assert not_a_key not in entry_keys
    error = refused(parse_recipe, {"zzzz": 1, "concept": [{"concept": "a"}]}, path)
    assert error.message == f"recipe '{path}': unknown key 'zzzz'" and error.hint.startswith("allowed: ")
    top_keys = error.hint.split("allowed: ")[1].split(", ")
    assert set(entry_keys) - set(top_keys) == {"concept"}  # the top level's concept is its tables
    assert "'concept'" not in refused(parse_recipe, {"concepts": ["a"], "concept": [{"concept": "a"}]}, path).hint


def test_a_key_set_twice_in_both_spellings_is_refused(tmp_path):
    error = refused(one_entry, tmp_path, output_dir="a", **{"output-dir": "b"})
    assert error.message.endswith("#1: 'output-dir' is set twice") and error.hint == "keep one of its spellings"


@pytest.mark.parametrize("key, value, words", [
    ("iterations", 2.5, "a whole number (got 2.5)"),
    ("iterations", True, "a whole number (got True)"),
    ("iterations", "ten", "a whole number (got 'ten')"),
    ("negative-guidance", "2", "a number (got '2')"),
    ("center-crop", 1, "true or false (got 1)"),
    ("initializer-token", 3, "a quoted string (got 3)"),
    ("images", 3, "a quoted path (got 3)"),
    ("device", 0, "a quoted string (got 0)"),
])
def test_a_value_of_the_wrong_type_says_what_it_must_be(tmp_path, key, value, words):
    error = refused(one_entry, tmp_path, **{key: value})
    assert error.message == f"recipe '{tmp_path / 'r.toml'}', [[concept]] #1: '{key}' must be {words}"
    assert error.hint == TYPES


def test_values_are_converted_to_what_the_request_holds(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    top = parse_recipe({"careset": "top.json", "concept": [{"concept": "a"}]}, tmp_path / "r.toml").defaults
    assert top == {"careset": tmp_path / "top.json"}
    entry = one_entry(tmp_path, negative_guidance=2, apg_eta=0.5, clip_model="ViT-B-16", images="imgs",
                      careset=str(tmp_path / "abs.json"), care_vocab="~/words.txt", center_crop=True)
    assert entry["negative_guidance"] == 2.0 and type(entry["negative_guidance"]) is float
    assert entry["apg_eta"] == 0.5 and entry["clip_model"] == "ViT-B-16" and entry["center_crop"] is True
    assert entry["images"] == tmp_path / "imgs"  # relative to the recipe file
    assert entry["careset"] == tmp_path / "abs.json" and entry["care_vocab"] == tmp_path / "home" / "words.txt"


@pytest.mark.parametrize("value", [[], ["a", 3], 3])
def test_a_name_list_holds_names(tmp_path, value):
    error = refused(one_entry, tmp_path, preserve=value)
    assert error.message.endswith(f"#1: 'preserve' must be a name or a list of names (got {value!r})")
    assert error.hint == 'e.g. preserve = "nudity"'


# planning: precedence and the checks before anything runs ----------------------------------------

def plan(tmp_path, data: dict, base: EraseRequest | None = None, explicit=frozenset(), **kwargs) -> list[Entry]:
    recipe = parse_recipe(data, tmp_path / "r.toml")
    return plan_entries(recipe, base or EraseRequest(concepts=[]), Runtime(model="tiny-random", device="cpu"),
                        set(explicit), **kwargs)


def test_the_config_file_and_the_recipe_win_over_a_models_defaults(tmp_path):
    base = EraseRequest(concepts=[], iterations=50, resolution=48)
    data = {"model": "toy", "method": "esd", "concept": [{"concept": "star"}, {"concept": "stripes", "resolution": 16}]}
    star, stripes = plan(tmp_path, data, base, configured={"iterations"})
    assert star.runtime.model == "toy" and star.runtime.device == "cpu"
    assert (star.request.iterations, star.request.resolution, star.request.stage1_lr) == (50, 32, 1e-4)
    assert (stripes.request.iterations, stripes.request.resolution) == (50, 16)
    typed = EraseRequest(concepts=[], seed=5, iterations=9)  # `--seed 5` typed, --iterations left at its default
    top, own = plan(tmp_path, {"method": "esd", "seed": 1, "iterations": 2,
                               "concept": [{"concept": "nudity"}, {"concept": "Van Gogh", "seed": 3}]}, typed, {"seed"})
    assert (top.request.seed, own.request.seed, top.request.iterations) == (5, 3, 2)
    # a typed --device beats the recipe's top level too
    (entry,) = plan(tmp_path, {"method": "esd", "device": "cuda", "concept": [{"concept": "nudity"}]}, explicit={"device"})
    assert entry.runtime.device == "cpu"
    (plain,) = plan(tmp_path, {"model": "toy", "concept": [{"concept": "star"}]}, base)
    assert (plain.request.iterations, plain.request.resolution) == (300, 32)
    assert plain.label == "#1 (star)"


def test_an_entrys_error_names_the_entry_and_keeps_its_hint(tmp_path):
    error = refused(plan, tmp_path, {"method": "esd", "concept": [{"concept": "nudity"}, {"concept": "a weird thing"}]})
    assert error.message.startswith(f"recipe '{tmp_path / 'r.toml'}', [[concept]] #2: 'a weird thing' is not a known")
    assert "--type" in error.hint
    error = refused(plan, tmp_path, {"method": "magic", "concept": [{"concept": "nudity"}]})
    assert error.message.endswith("#1: unknown method 'magic'") and "esd" in error.hint
    error = refused(plan, tmp_path, {"dtype": "fp13", "concept": [{"concept": "nudity", "method": "esd"}]})
    assert error.message.endswith("#1: --dtype 'fp13' is not a dtype") and error.hint == "use auto, fp32, fp16 or bf16"


@pytest.mark.parametrize("key", ["images", "careset", "care_vocab"])
def test_a_missing_input_path_is_named_with_the_recipe_folder_in_mind(tmp_path, key):
    error = refused(plan, tmp_path, {"method": "esd", "concept": [{"concept": "nudity", key: "nowhere"}]})
    assert error.message.endswith(f"#1: {key} '{tmp_path / 'nowhere'}' does not exist")
    assert error.hint == "paths in a recipe are relative to the recipe file"


def test_the_same_run_twice_or_one_folder_for_two_runs_is_refused(tmp_path):
    path = tmp_path / "r.toml"
    error = refused(plan, tmp_path, {"method": "esd", "concept": [{"concept": "nudity"}, {"concept": "Van Gogh"},
                                                                 {"concept": "nudity"}]})
    assert error.message == f"recipe '{path}': [[concept]] #1 and #3 are the same run"
    assert error.hint == "remove the duplicate entry"
    tables = [{"concept": "nudity"}, {"concept": "Van Gogh", "output-dir": "runs/x"},
              {"concept": "nudity", "output-dir": "runs/y/../x"}]
    error = refused(plan, tmp_path, {"method": "esd", "concept": tables})
    assert error.message == f"recipe '{path}': [[concept]] #2 and #3 both write to '{tmp_path / 'runs/y/../x'}'"
    assert error.hint.startswith("give each [[concept]] its own output-dir")
    tables[2]["output-dir"] = "runs/z"
    assert [e.request.output_dir for e in plan(tmp_path, {"method": "esd", "concept": tables})] == [
        None, tmp_path / "runs/x", tmp_path / "runs/z"]


# running, through a method plugin ------------------------------------------------------------------

@pytest.fixture
def plugin_method(monkeypatch, tmp_path):
    """A third-party method `echo`, which records what it ran; a concept named fail-* makes it fail."""
    from recare_cli.plugins import Method, registry

    ran = []

    def run(request, runtime, reporter):
        ran.append(request.concepts)
        name = request.concepts[0]
        reporter.event("echo", concept=name, device=runtime.device)
        if name == "slow":
            time.sleep(0.02)
        if name == "fail-usage":
            raise UsageError("no images in\n  the folder", hint="pass --images")
        if name == "fail-bug":
            raise ValueError("bad  thing")
        if name == "fail-ctrl-c":
            raise Interrupted("interrupted")
        stages = {"s": {"reused": True}, "t": {"reused": name == "reused"}} if name != "nothing" else {}
        return EraseResult(tmp_path / name, f"{name}-1234", tmp_path / name / "unet.safetensors", ["<x>"], stages)

    monkeypatch.setitem(registry().methods, "echo", Method("echo", run))
    return ran


def run_plugin(tmp_path, names: list, mode=JSON):
    recipe = parse_recipe({"method": "echo", "concept": [{"concept": n} for n in names]}, tmp_path / "r.toml")
    entries = plan_entries(recipe, EraseRequest(concepts=[]), Runtime(model="tiny-random", device="cpu"), set())
    out, err = io.StringIO(), io.StringIO()
    try:
        outcomes = run_recipe(recipe, entries, Reporter(mode, stdout=out, stderr=err))
        error = None
    except Interrupted:
        raise
    except RecareError as exc:
        outcomes, error = None, exc
    return outcomes, error, out.getvalue(), err.getvalue()


def results(out: str) -> list[dict]:
    """The JSON result lines; the method's own events (one per entry it ran) are checked apart."""
    lines = [json.loads(line) for line in out.splitlines()]
    return [line for line in lines if "event" not in line]


def test_a_plugin_methods_entries_are_not_checked_by_recares_rules(tmp_path, plugin_method):
    entries = plan(tmp_path, {"method": "echo", "rounds": 0, "concept": [{"concept": "a weird thing"}]})
    assert entries[0].request.rounds == 0


def test_every_entry_runs_and_reports_one_row_and_a_summary(tmp_path, plugin_method):
    started = time.perf_counter()
    outcomes, error, out, err = run_plugin(tmp_path, ["done", "reused", "nothing"])
    elapsed = time.perf_counter() - started
    assert error is None and err == "" and plugin_method == [["done"], ["reused"], ["nothing"]]
    # each entry runs with its own runtime and reports through the recipe's reporter
    assert [json.loads(line) for line in out.splitlines() if '"event"' in line] == [
        {"event": "echo", "concept": name, "device": "cpu"} for name in ("done", "reused", "nothing")]
    rows = results(out)
    assert all(type(r["seconds"]) is float and 0 <= r["seconds"] <= elapsed for r in rows)
    assert rows[0] == {"entry": 1, "concepts": ["done"], "method": "echo", "status": "done",
                       "run_dir": str(tmp_path / "done"), "cache_name": "done-1234",
                       "unet": str(tmp_path / "done" / "unet.safetensors"), "tokens": ["<x>"],
                       "seconds": rows[0]["seconds"], "error": None}
    assert [r["status"] for r in rows[:3]] == ["done", "reused", "done"]  # no stage at all is not "reused"
    assert rows[3] == {"recipe": str(tmp_path / "r.toml"), "entries": 3, "done": 2, "reused": 1, "failed": 0,
                       "seconds": rows[3]["seconds"]}
    assert [o.status for o in outcomes] == ["done", "reused", "done"]


def test_a_failed_entry_is_one_warning_and_the_rest_still_run(tmp_path, plugin_method):
    outcomes, error, out, err = run_plugin(tmp_path, [["fail-usage", "x"], "done", "fail-bug"])
    assert outcomes is None and plugin_method == [["fail-usage", "x"], ["done"], ["fail-bug"]]
    rows = results(out)
    assert rows[0]["status"] == "failed" and rows[0]["error"] == "no images in the folder (pass --images)"
    assert (rows[0]["run_dir"], rows[0]["cache_name"], rows[0]["unet"], rows[0]["tokens"]) == (None, None, None, [])
    assert rows[2]["error"] == "unexpected ValueError: bad thing"
    assert rows[3] | {"seconds": 0} == {"recipe": str(tmp_path / "r.toml"), "entries": 3, "done": 1, "reused": 0,
                                        "failed": 2, "seconds": 0}
    warnings = err.splitlines()
    assert warnings == ["Warning: [[concept]] #1 (fail-usage, x) failed: no images in the folder (pass --images); "
                        "going on with the next",
                        "Warning: [[concept]] #3 (fail-bug) failed: unexpected ValueError: bad thing; going on with the next"]
    assert type(error) is RecareError and error.message == "2 of 3 recipe entries failed: #1 (fail-usage, x), #3 (fail-bug)"
    assert error.hint == "the others finished; fix those and rerun the recipe, which reuses finished runs"


def test_each_entry_is_timed_and_the_summary_adds_them_up(tmp_path, plugin_method):
    started = time.perf_counter()
    _, _, out, _ = run_plugin(tmp_path, ["slow", "done", "slow-too"])
    elapsed = time.perf_counter() - started
    rows = results(out)
    seconds = [r["seconds"] for r in rows[:3]]
    assert 0.02 <= seconds[0] <= elapsed and sum(seconds) <= elapsed
    assert type(rows[3]["seconds"]) is float and rows[3]["seconds"] == round(sum(seconds), 3)


def test_ctrl_c_stops_the_whole_recipe(tmp_path, plugin_method):
    with pytest.raises(Interrupted):
        run_plugin(tmp_path, ["done", "fail-ctrl-c", "done-too"])
    assert plugin_method == [["done"], ["fail-ctrl-c"]]


def test_human_mode_prints_a_line_per_entry_and_one_table(tmp_path, plugin_method, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")  # one table row a line, however long tmp_path is
    _, _, out, _ = run_plugin(tmp_path, [["done", "too"], "reused", "fail-bug"], mode=HUMAN)
    lines = out.splitlines()
    assert lines[0].startswith("[1/3] done, too (echo): done in ") and lines[0].endswith(" s")
    assert lines[1].startswith("[2/3] reused (echo): reused in ")
    assert lines[2].startswith("[3/3] fail-bug (echo): failed in ")
    cells = [[cell.strip() for cell in line.replace("\u2503", "\u2502").split("\u2502")[1:-1]]
             for line in lines[3:] if "\u2502" in line or "\u2503" in line]
    assert cells[0] == ["#", "concept", "method", "status", "run dir", "cache name", "seconds"]
    assert cells[1][:6] == ["1", "done, too", "echo", "done", str(tmp_path / "done"), "done-1234"]
    assert cells[2][:4] == ["2", "reused", "echo", "reused"]
    assert cells[3][:6] == ["3", "fail-bug", "echo", "failed", "-", "-"]
    assert all(float(row[6]) >= 0 for row in cells[1:])


# sharing entries out under `accelerate launch` ---------------------------------------------------

def _entry(index: int, model: Path, **request) -> Entry:
    return Entry(index, EraseRequest(**{"concepts": ["nudity"], "method": "esd", **request}),
                 Runtime(model=str(model), device="cpu"))


def test_entries_are_shared_out_evenly_in_recipe_order(tmp_path, plugin_method):
    entries = [Entry(i, EraseRequest(concepts=[f"c{i}"], method="echo"), Runtime()) for i in range(1, 6)]
    assert share_out(entries, 2) == [[0, 2, 4], [1, 3]]
    assert share_out(entries, 3) == [[0, 3], [1, 4], [2]]
    assert share_out(entries[:1], 2) == [[0], []]


def test_entries_that_would_write_one_run_directory_go_to_one_process(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "model_index.json").write_text("{}")
    entries = [_entry(1, model), _entry(2, model, seed=7), _entry(3, model, seed=8),
               _entry(4, model, negative_guidance=1.0), _entry(5, model, concepts=["a weird thing"]),
               _entry(6, model, concepts=["another weird thing"])]
    # #4 sets ESD's default eta: the same run as #1; #5 and #6 cannot be planned, so each goes by itself
    assert share_out(entries, 2) == [[0, 3, 4], [1, 2, 5]]
    assert share_out(entries, 3) == [[0, 3], [1, 4], [2, 5]]


@dataclasses.dataclass(frozen=True)
class _Device:
    """A runtime as _run_spread sees it: only its device (no CUDA needed to claim one)."""

    device: str

    def torch_device(self) -> str:
        return self.device


def _spread(monkeypatch, rank: int, devices: list[str]):
    """_run_spread in process `rank` of 2, with accelerate's collectives replaced by recorders."""
    from recare_cli.erase import recipe

    entries = [Entry(i + 1, EraseRequest(concepts=[f"c{i + 1}"], method="echo"), _Device(d))
               for i, d in enumerate(devices)]
    seen = {"ran": [], "alone": False}
    main_plan = [[3, 1], [0, 2, 4]]  # not share_out's: every process must follow the main's plan

    @contextlib.contextmanager
    def alone():
        seen["alone"] = True
        yield
        seen["alone"] = False

    def broadcast(value, group):
        seen["sent"] = (value, group)
        return main_plan

    def run_entry(entry, reporter):
        seen["ran"].append((entry.index, entry.runtime, reporter, seen["alone"]))
        return recipe.Outcome(entry, recipe.DONE, 0.0)

    def gather(outcomes, group):
        seen["gathered"] = (list(outcomes), group)
        if rank != 0:
            return None
        others = [recipe.Outcome(entries[p], recipe.DONE, 0.0) for p in main_plan[1 - rank]]
        return others + outcomes

    monkeypatch.setattr(recipe, "process_group", lambda runtime: seen.setdefault("group_of", runtime) and (rank, 2, "state"))
    monkeypatch.setattr(recipe, "waiting_group", lambda: "group")
    monkeypatch.setattr(recipe, "broadcast_from_main", broadcast)
    monkeypatch.setattr(recipe, "gather_to_main", gather)
    monkeypatch.setattr(recipe, "alone", alone)
    monkeypatch.setattr(recipe, "own_device", lambda runtime, state: ("own", runtime.device, state))
    monkeypatch.setattr(recipe, "_run_entry", run_entry)
    reporter = Reporter(JSON, stdout=io.StringIO(), stderr=io.StringIO())
    return entries, main_plan, seen, reporter, recipe._run_spread(entries, reporter)


@pytest.mark.parametrize("rank", [0, 1])
def test_each_process_runs_the_mains_share_for_it_alone_on_its_own_device(monkeypatch, rank):
    from recare_cli.output import QUIET_REPORTER

    entries, main_plan, seen, reporter, returned = _spread(monkeypatch, rank, ["cpu", "cpu", "cuda:1", "cuda:0", "cpu"])
    assert seen["group_of"] == entries[2].runtime  # the process group is made on the first accelerator named
    assert seen["sent"] == ((share_out(entries, 2) if rank == 0 else None), "group")  # only the main plans
    mine = [entries[p] for p in main_plan[rank]]
    assert seen["ran"] == [(e.index, ("own", e.runtime.device, "state"), reporter if rank == 0 else QUIET_REPORTER, True)
                           for e in mine]
    assert seen["alone"] is False  # `alone` is left once this share is done
    assert [o.entry.index for o in seen["gathered"][0]] == [e.index for e in mine] and seen["gathered"][1] == "group"
    if rank == 0:  # every process's outcomes, in recipe order
        assert [o.entry.index for o in returned] == [1, 2, 3, 4, 5]
    else:
        assert returned is None


def test_without_an_accelerator_the_process_group_is_made_on_the_first_entrys_runtime(monkeypatch):
    entries, _, seen, _, _ = _spread(monkeypatch, 0, ["cpu"] * 5)
    assert seen["group_of"] is entries[0].runtime


def test_under_a_launch_only_the_main_process_reports_as_one_process_would(tmp_path, plugin_method, monkeypatch):
    import re

    from recare_cli.erase import recipe

    names = ["done", "fail-bug", "reused"]
    alone = {mode: run_plugin(tmp_path, names, mode) for mode in (JSON, HUMAN)}
    monkeypatch.setattr(recipe, "launched_world", lambda: 2)
    monkeypatch.setattr(recipe, "_run_spread", lambda entries, reporter: None)  # not the main process
    assert run_plugin(tmp_path, names) == ([], None, "", "")
    monkeypatch.setattr(recipe, "_run_spread", lambda entries, reporter: [  # the main, after the gather
        recipe._run_entry(e, reporter) for e in reversed(entries)][::-1])
    for mode, (alone_outcomes, alone_error, alone_out, _) in alone.items():
        outcomes, error, out, _ = run_plugin(tmp_path, names, mode)
        assert outcomes is None and alone_outcomes is None and str(error) == str(alone_error)
        if mode == JSON:  # a row per entry, then the summary; the method's own events through the same reporter
            def timeless(text):
                rows = [{k: v for k, v in row.items() if k != "seconds"} for row in results(text)]
                return rows, sorted(line for line in text.splitlines() if '"event"' in line)
        else:  # "[2/3] fail-bug (echo): failed in 0.0 s" and the table
            def timeless(text):
                return re.sub(r"\d+\.\d+", "T", text)
        assert timeless(out) == timeless(alone_out) and len(results(alone[JSON][2])) == 4
