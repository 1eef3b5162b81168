"""Plugins: built-ins and third-party packages register through the same entry-point groups."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest

from recare_cli.errors import RecareError
from recare_cli.plugins import ConceptType, Metric, Registry

REPO_ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_SRC = REPO_ROOT / "plugins" / "recare-example"
RECARE = Path(sys.executable).parent / "recare"

BROKEN_PYPROJECT = """\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "recare-broken"
version = "9.9.9"

[project.entry-points."recare.metrics"]
broken = "recare_broken:register"

[tool.setuptools]
packages = ["recare_broken"]
"""


def _pip_install(src: Path, target: Path) -> Path:
    # A real install: pip writes the dist-info whose entry_points.txt importlib.metadata reads.
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
         "--disable-pip-version-check", "--target", str(target), str(src)],
        check=True, capture_output=True, timeout=300,
    )
    return target


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict[str, Path]:
    """site folders holding a real install of the example plugin and of a plugin that cannot import."""
    root = tmp_path_factory.mktemp("plugins")
    # Built from copies: building in place would leave build/ and *.egg-info in the repository.
    example = shutil.copytree(EXAMPLE_SRC, root / "src" / "recare-example",
                              ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    broken = root / "src" / "recare-broken"
    (broken / "recare_broken").mkdir(parents=True)
    (broken / "pyproject.toml").write_text(BROKEN_PYPROJECT)
    (broken / "recare_broken" / "__init__.py").write_text("import recare_dependency_that_is_not_installed\n")
    return {"example": _pip_install(example, root / "site-example"),
            "broken": _pip_install(broken, root / "site-broken")}


def _recare(*args: str, sites: list[Path] = (), **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("RECARE_LOAD_PLUGINS", "RECARE_STRICT_PLUGINS")}
    base["PYTHONPATH"] = os.pathsep.join(str(s) for s in sites)
    return subprocess.run([str(RECARE), *args], env={**base, **env}, capture_output=True, text=True, timeout=120)


def _listing(done: subprocess.CompletedProcess) -> dict:
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def _plugin(listing: dict, name: str) -> dict:
    return next(p for p in listing["plugins"] if p["name"] == name)


def test_builtins_are_listed_as_plugins(run_cli):
    result = run_cli("plugins", "list", "--json")
    assert result.exit_code == 0, result.stderr
    listing = json.loads(result.stdout.strip().splitlines()[-1])
    from recare_cli import __version__

    builtins = [p for p in listing["plugins"] if p["package"] == "builtin"]
    assert {p["group"] for p in builtins} == {"recare.concept_types", "recare.metrics", "recare.methods", "recare.attacks"}
    assert all(p["version"] == __version__ and p["error"] is None for p in builtins)
    assert {"object", "style", "person"} <= set(listing["concept_types"])
    assert {"recare", "esd", "uce"} <= set(listing["methods"])
    assert {"unlearndiffatk", "concept-inversion"} <= set(listing["attacks"])
    concept_plugin = next(p for p in builtins if p["group"] == "recare.concept_types")
    assert concept_plugin["registers"] == ["object", "style", "person"]


def test_human_listing_is_a_table(run_cli):
    result = run_cli("plugins", "list")
    assert result.exit_code == 0, result.stderr
    assert "registers" in result.stdout and "concept_types" in result.stdout and "esd" in result.stdout


def test_example_plugin_installed_with_pip_is_listed(installed):
    listing = _listing(_recare("plugins", "list", "--json", sites=[installed["example"]]))
    landmark = _plugin(listing, "landmark")
    assert (landmark["package"], landmark["version"], landmark["group"]) == ("recare-example", "0.1.0",
                                                                             "recare.concept_types")
    assert landmark["registers"] == ["landmark"]
    assert _plugin(listing, "colorfulness")["registers"] == ["colorfulness"]
    assert "landmark" in listing["concept_types"] and "colorfulness" in listing["metrics"]
    assert {"object", "style", "person"} <= set(listing["concept_types"])


def _colour_images(folder: Path) -> Path:
    from PIL import Image

    folder.mkdir()
    Image.new("RGB", (8, 8), (128, 128, 128)).save(folder / "grey.png")
    red_green = Image.new("RGB", (8, 8), (255, 0, 0))
    red_green.paste((0, 255, 0), (0, 0, 8, 4))
    red_green.save(folder / "red_green.png")
    return folder


def test_example_metric_runs_through_recare_eval(installed, tmp_path):
    images = _colour_images(tmp_path / "images")
    out = tmp_path / "eval"
    done = _recare("eval", "--metric", "colorfulness", "--images", str(images), "--output-dir", str(out),
                   "--model", "tiny-random", "--json", sites=[installed["example"]])
    assert done.returncode == 0, done.stderr
    # Half pure red, half pure green: red-green is +-255 (std 255, mean 0), yellow-blue is 127.5
    # everywhere (std 0, mean 127.5), so M = 255 + 0.3 * 127.5. A grey image has none.
    red_green = 255 + 0.3 * 127.5
    summary = next(row for row in map(json.loads, done.stdout.splitlines()) if "colorfulness" in row)
    assert summary["colorfulness"] == pytest.approx(red_green / 2) and summary["images"] == 2
    with open(out / "results.csv", newline="") as f:
        per_image = {row["image"]: float(row["colorfulness"]) for row in csv.DictReader(f) if row["detail"] == "1"}
    assert per_image == {"grey.png": pytest.approx(0.0), "red_green.png": pytest.approx(red_green)}


def test_example_attack_runs_through_recare_eval(installed, tmp_path):
    out = tmp_path / "eval"
    done = _recare("eval", "--metric", "colorfulness", "--prompt", "a photo of the Eiffel Tower", "--attack", "random-prefix",
                   "--attack-tokens", "3", "--output-dir", str(out), "--model", "tiny-random", "--device", "cpu",
                   "--steps", "1", "--height", "64", "--width", "64", "--json", sites=[installed["example"]])
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    (attacked,) = [line for line in lines if line.get("event") == "attacked"]
    assert attacked["prompt"] == "a photo of the Eiffel Tower" and attacked["adversarial"].endswith(" a photo of the Eiffel Tower")
    with open(out / "attacks" / "model+random-prefix" / "prompts.csv", newline="") as f:
        assert [row["prompt"] for row in csv.DictReader(f)] == [attacked["adversarial"]]
    measured = {line["model"] for line in lines if "colorfulness" in line}
    assert measured == {"model", "model+random-prefix", "delta model+random-prefix"}


def test_example_metric_and_type_are_unknown_without_the_plugin(tmp_path):
    images = _colour_images(tmp_path / "images")
    done = _recare("eval", "--metric", "colorfulness", "--images", str(images), "--output-dir", str(tmp_path / "e"),
                   "--model", "tiny-random")
    assert done.returncode == 2 and "unknown metric 'colorfulness'" in done.stderr


def test_erase_accepts_the_example_concept_type(installed, tmp_path):
    # An unknown --type lists what erase accepts: the plugin's type sits next to the built-ins.
    done = _recare("erase", "--concept", "Eiffel Tower", "--type", "nosuch", "--model", "tiny-random",
                   "--output-dir", str(tmp_path / "run"), sites=[installed["example"]])
    assert done.returncode == 2
    assert "unknown concept type 'nosuch'" in done.stderr and "landmark, object, person, style" in done.stderr
    assert not (tmp_path / "run").exists()


def test_broken_plugin_costs_one_warning_line(installed):
    sites = [installed["broken"], installed["example"]]
    help_run = _recare("--help", sites=sites)
    assert help_run.returncode == 0 and "Usage: recare" in help_run.stdout
    assert "Traceback" not in help_run.stderr

    done = _recare("plugins", "list", "--json", sites=sites)
    listing = _listing(done)
    warnings = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(warnings) == 1, done.stderr
    assert warnings[0].startswith("Warning: plugin 'broken' (recare.metrics)")
    assert "recare_dependency_that_is_not_installed" in warnings[0]
    broken = _plugin(listing, "broken")
    assert broken["registers"] == [] and "ModuleNotFoundError" in broken["error"]
    assert "landmark" in listing["concept_types"], "the working plugin must still load"


def test_strict_plugins_turns_the_warning_into_an_error(installed):
    done = _recare("plugins", "list", sites=[installed["broken"]], RECARE_STRICT_PLUGINS="1")
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: plugin 'broken' (recare.metrics) failed to load")
    assert "Traceback" not in done.stderr and done.stdout == ""


@pytest.mark.parametrize("only, loaded", [("landmark,colorfulness", {"landmark", "colorfulness"}),
                                          ("recare-example", {"landmark", "colorfulness", "random-prefix"})])
def test_load_plugins_filters_by_plugin_or_package_name(installed, only, loaded):
    done = _recare("plugins", "list", "--json", sites=[installed["broken"], installed["example"]],
                   RECARE_LOAD_PLUGINS=only)
    listing = _listing(done)
    assert done.stderr == ""
    assert {p["name"] for p in listing["plugins"] if p["package"] != "builtin"} == loaded


def test_load_plugins_warns_about_a_name_nothing_provides(installed):
    done = _recare("plugins", "list", "--json", sites=[installed["example"]], RECARE_LOAD_PLUGINS="landmark,typo")
    listing = _listing(done)
    assert [p["name"] for p in listing["plugins"] if p["package"] != "builtin"] == ["landmark"]
    assert "RECARE_LOAD_PLUGINS names typo" in done.stderr


# In-process checks of the loader itself (entry points pointing at hooks in this module) -------------

LANDMARK = ConceptType(name="landmark2", templates=("a photo of the {}",), care_style="photo",
                       initializer_token="building", target_prompt="A photo of the {}")


def _registers_then_fails(register):
    register(LANDMARK)
    raise RuntimeError("failed\nhalf-way")


def _registers_a_metric_in_the_wrong_group(register):
    register(Metric(name="oops", run=print))


def _load(hook: str, group: str, strict: bool = False) -> tuple[Registry, list[str]]:
    warnings: list[str] = []
    reg = Registry()
    reg.load(EntryPoint("test", f"{__name__}:{hook}", group), "tests", "1.0", strict=strict, warn=warnings.append)
    return reg, warnings


def test_a_plugin_that_fails_half_way_registers_nothing():
    reg, warnings = _load("_registers_then_fails", "recare.concept_types")
    assert reg.concept_types == {}
    assert warnings == ["plugin 'test' (recare.concept_types) failed to load and was skipped: "
                        "RuntimeError: failed half-way"]
    assert reg.plugins[0].registered == [] and reg.plugins[0].error == "RuntimeError: failed half-way"


def test_a_plugin_must_register_what_its_group_holds():
    reg, warnings = _load("_registers_a_metric_in_the_wrong_group", "recare.concept_types")
    assert reg.metrics == {} and "takes concept_types, got Metric" in warnings[0]
    with pytest.raises(RecareError, match="plugin 'test' .* failed to load"):
        _load("_registers_a_metric_in_the_wrong_group", "recare.concept_types", strict=True)
