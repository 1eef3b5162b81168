"""What every command shares: common options, output modes, config defaults, exit codes, `recare cache`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import typer

from recare_cli.cli.app import COMMANDS, app

TINY_ARGS = ("--model", "tiny-random", "--device", "cpu", "--height", "64", "--width", "64", "--steps", "2")
COMMON_OPTIONS = {"--model", "--device", "--dtype", "--json", "--quiet", "--verbose", "--offline", "--cache-dir"}


def one_error_line(result) -> str:
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


# start-up ---------------------------------------------------------------------------------------

def test_help_does_not_import_torch():
    code = (
        "import sys\n"
        "from recare_cli.cli import app\n"
        "for args in (['--help'], ['generate', '--help'], ['cache', '--help']):\n"
        "    assert app(args, prog_name='recare', standalone_mode=False) == 0\n"
        "heavy = sorted(m for m in ('torch', 'diffusers', 'transformers', 'open_clip', 'accelerate') if m in sys.modules)\n"
        "print('HEAVY', heavy)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "HEAVY []" in done.stdout


def test_help_documents_commands_and_exit_codes(run_cli):
    result = run_cli("--help")
    assert result.exit_code == 0
    assert "Exit codes: 0 ok, 1 error, 2 usage, 3 model not available" in " ".join(result.stdout.split())
    assert "130 interrupted" in " ".join(result.stdout.split())
    for name in [*COMMANDS, "cache"]:
        assert name in result.stdout


def test_defaults_written_in_help_text_survive_rich_rendering(run_cli):
    # rich reads "[default: 0.75]" inside a help string as markup and prints nothing for it
    cells = "".join(c for c in run_cli("eval", "--help").stdout if c not in "│ \n")  # help wraps in table cells
    for default in ("(default:0.75)", "(default:object5,style3)", "(default:openai)"):
        assert default in cells


def test_no_help_text_loses_words_to_rich_markup():
    from rich.text import Text

    from recare_cli.devtools import _root_command

    def texts(command):
        yield command.name, command.help or ""
        for param in command.params:
            yield f"{command.name} {param.name}", getattr(param, "help", None) or ""
        for sub in getattr(command, "commands", {}).values():
            yield from texts(sub)

    eaten = [where for where, text in texts(_root_command()) if Text.from_markup(text).plain != text]
    assert eaten == []


def test_no_arguments_shows_the_help(run_cli):
    result = run_cli()
    assert result.exit_code == 2
    assert "Usage: recare" in result.output and "Error" not in result.output


def test_version(run_cli):
    from recare_cli import __version__

    result = run_cli("--version")
    assert (result.exit_code, result.stdout.strip()) == (0, f"recare {__version__}")


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_accepts_the_common_options(name):
    command = typer.main.get_command(app).commands[name]
    options = {opt for param in command.params for opt in param.opts}
    assert COMMON_OPTIONS <= options


# exit codes and errors --------------------------------------------------------------------------

def test_unknown_option_is_a_usage_error(run_cli):
    result = run_cli("generate", "--prompt", "a cat", "--stepz", "3")
    assert result.exit_code == 2
    assert "No such option: --stepz" in one_error_line(result)


def test_bad_dtype_is_a_usage_error(run_cli, tmp_path):
    result = run_cli("generate", "--prompt", "a cat", "--dtype", "fp64", "--output-dir", tmp_path / "out")
    assert result.exit_code == 2
    assert "fp64" in one_error_line(result)


def test_verbose_adds_the_traceback(run_cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ("generate", "--prompt", "a cat", "--model", "./no-such-model", "--output-dir", tmp_path / "out")
    plain = run_cli(*args)
    assert plain.exit_code == 3
    assert "model './no-such-model' not found" in one_error_line(plain)
    verbose = run_cli(*args, "--verbose")
    assert verbose.exit_code == 3
    assert "Traceback" in verbose.stderr
    assert verbose.stderr.rstrip().splitlines()[-1] == one_error_line(plain)


# output modes -----------------------------------------------------------------------------------

def test_human_mode_logs_on_stderr_and_summarises_on_stdout(run_cli, tmp_path):
    result = run_cli("generate", "--prompt", "a cat", *TINY_ARGS, "--output-dir", tmp_path)
    assert result.exit_code == 0, result.stderr
    assert "Generating 1 of 1 images with tiny-random on cpu" in result.stderr
    assert result.stdout.strip() == f"1 generated, 0 already there → {tmp_path}"


def test_json_mode_prints_only_json_lines(run_cli, tmp_path):
    result = run_cli("generate", "--prompt", "a cat", *TINY_ARGS, "--output-dir", tmp_path, "--json")
    assert result.exit_code == 0, result.stderr
    assert [json.loads(line) for line in result.stdout.splitlines()] == [
        {"output_dir": str(tmp_path), "generated": 1, "skipped": 0, "total": 1}
    ]
    assert "Generating" not in result.stderr and "images" not in result.stderr


def test_quiet_mode_prints_nothing(run_cli, tmp_path):
    result = run_cli("generate", "--prompt", "a cat", *TINY_ARGS, "--output-dir", tmp_path, "--quiet")
    assert result.exit_code == 0, result.stderr
    assert (result.stdout, result.stderr) == ("", "")
    assert (tmp_path / "a_cat_0.png").is_file()


def test_cache_dir_option_holds_the_builtin_model(run_cli, tmp_path):
    cache = tmp_path / "my-cache"
    out = tmp_path / "images"
    result = run_cli("generate", "--prompt", "a cat", *TINY_ARGS, "--cache-dir", cache, "--output-dir", out, "-q")
    assert result.exit_code == 0, result.stderr
    assert (cache / "models" / "tiny-random" / "model_index.json").is_file()

    listing = json.loads(run_cli("cache", "--cache-dir", cache, "--json").stdout)
    assert [(e["section"], e["name"]) for e in listing["entries"]] == [("models", "tiny-random")]
    assert listing["entries"][0]["size_bytes"] > 100_000


# the config file --------------------------------------------------------------------------------

@pytest.fixture
def config_file(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "config.toml"
    monkeypatch.setenv("RECARE_CONFIG", str(path))
    return path


def test_config_file_sets_defaults_and_the_command_line_wins(config_file, run_cli, tmp_path):
    config_file.write_text(
        'model = "tiny-random"\ndevice = "cpu"\njson = true\n'
        "[generate]\nsteps = 2\nheight = 64\nwidth = 64\nseed = 5\n"
    )
    out = tmp_path / "images"
    result = run_cli("generate", "--prompt", "a cat", "--output-dir", out, "--seed", "9")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["generated"] == 1
    line = json.loads((out / "manifest.jsonl").read_text())
    assert (line["model"], line["steps"], line["height"], line["seed"]) == ("tiny-random", 2, 64, 9)


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    ("steps = [", "is not valid TOML"),
    ("stepz = 25", "no command has an option 'stepz'"),
    ("[generate]\nstepz = 25", "[generate] has no option 'stepz'"),
    ("[generat]\nsteps = 25", "unknown section [generat]"),
])
def test_broken_config_file_is_a_usage_error(config_file, run_cli, content, message):
    if content is not None:
        config_file.write_text(content)
    result = run_cli("generate", "--prompt", "a cat")
    assert result.exit_code == 2
    assert message in one_error_line(result)


# recare cache -----------------------------------------------------------------------------------

@pytest.fixture
def filled_cache(tmp_path) -> Path:
    from recare_cli.cache import register_erased

    root = tmp_path / "cache"
    (root / "models" / "some-model").mkdir(parents=True)
    (root / "models" / "some-model" / "weights.bin").write_bytes(b"x" * 3000)
    (root / "clip" / "ViT-B-32-openai").mkdir(parents=True)
    (root / "clip" / "ViT-B-32-openai" / "vocab.npy").write_bytes(b"y" * 500)
    register_erased(root, "no-nudity", tmp_path, {"concept": "nudity"})
    (root / "clip" / ".partial-write").mkdir()  # an entry being written: hidden, not listed
    (root / "clip" / "stray.txt").write_bytes(b"z" * 20)  # a file where entries are folders
    return root


def test_cache_shows_location_entries_and_sizes(filled_cache, run_cli, monkeypatch):
    listing = json.loads(run_cli("cache", "--cache-dir", filled_cache, "--json").stdout)
    assert listing["cache_dir"] == str(filled_cache)
    sizes = {(e["section"], e["name"]): e["size_bytes"] for e in listing["entries"]}
    assert sizes.keys() == {("models", "some-model"), ("clip", "ViT-B-32-openai"), ("clip", "stray.txt"),
                            ("erased", "no-nudity")}
    assert sizes[("models", "some-model")] == 3000 and sizes[("clip", "ViT-B-32-openai")] == 500
    assert listing["total_bytes"] == sum(sizes.values())

    monkeypatch.setenv("RECARE_CACHE_DIR", str(filled_cache))
    human = run_cli("cache")
    assert human.exit_code == 0
    assert str(filled_cache) in human.stdout
    assert "some-model" in human.stdout and "2.9 KiB" in human.stdout


def test_cache_clear_one_entry_a_section_and_everything(filled_cache, run_cli):
    result = run_cli("cache", "clear", "no-nudity", "--yes", "--cache-dir", filled_cache, "--json")
    assert json.loads(result.stdout)["removed"] == ["erased/no-nudity"]
    result = run_cli("cache", "clear", "--section", "clip", "--yes", "--cache-dir", filled_cache, "--json")
    assert json.loads(result.stdout) == {"removed": ["clip/ViT-B-32-openai", "clip/stray.txt"], "freed_bytes": 520}
    assert (filled_cache / "clip" / ".partial-write").is_dir()
    assert (filled_cache / "models" / "some-model").is_dir()
    result = run_cli("cache", "clear", "--yes", "--cache-dir", filled_cache)
    assert result.exit_code == 0 and "removed 1 entries" in result.stdout
    assert not any((filled_cache / "models").iterdir())


@pytest.mark.parametrize("args", [["kept-run"], ["--section", "erased"], []], ids=["by-name", "section", "all"])
def test_cache_clear_forgets_an_erased_model_but_never_touches_its_run_directory(tmp_path, run_cli, args):
    from recare_cli.cache import lookup_erased, register_erased

    root = tmp_path / "cache"
    run_dir = tmp_path / "runs" / "star"
    run_dir.mkdir(parents=True)
    (run_dir / "unet.safetensors").write_bytes(b"the user's erased weights")
    register_erased(root, "kept-run", run_dir, {"concept": "star"})
    assert lookup_erased(root, "kept-run") == run_dir.resolve()
    result = run_cli("cache", "clear", *args, "--yes", "--cache-dir", root, "--json")
    assert result.exit_code == 0, result.stderr
    assert "erased/kept-run" in json.loads(result.stdout)["removed"]
    assert lookup_erased(root, "kept-run") is None
    assert (run_dir / "unet.safetensors").read_bytes() == b"the user's erased weights"


def test_an_erased_model_registered_again_points_at_its_latest_run_and_a_deleted_run_is_forgotten(tmp_path):
    from recare_cli.cache import lookup_erased, register_erased

    root = tmp_path / "cache"
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    register_erased(root, "star", first, {})
    register_erased(root, "star", second, {})  # the same name again, e.g. a rerun elsewhere
    assert lookup_erased(root, "star") == second.resolve()
    second.rmdir()
    assert lookup_erased(root, "star") is None


def test_the_cache_defaults_to_the_platform_cache_folder(tmp_path, monkeypatch):
    from platformdirs import user_cache_dir

    from recare_cli.cache import cache_root

    monkeypatch.delenv("RECARE_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # where platformdirs puts it on Linux
    assert cache_root() == Path(user_cache_dir("recare"))
    if sys.platform.startswith("linux"):
        assert cache_root() == tmp_path / "recare"


def test_cache_clear_without_a_terminal_needs_yes(filled_cache, run_cli):
    # CliRunner's stdin is no terminal; answering on one is tested with a pty in test_bad_inputs.py.
    result = run_cli("cache", "clear", "--cache-dir", filled_cache, input="y\n")
    assert result.exit_code == 2 and "pass --yes" in result.stderr
    assert (filled_cache / "models" / "some-model").is_dir()


@pytest.mark.parametrize("args, message", [
    (["never-stored"], "nothing named 'never-stored'"),
    (["--section", "weights"], "unknown cache section 'weights'"),
])
def test_cache_clear_bad_input(filled_cache, run_cli, args, message):
    result = run_cli("cache", "clear", *args, "--yes", "--cache-dir", filled_cache)
    assert result.exit_code == 2
    assert message in one_error_line(result)


# the installed entry points ---------------------------------------------------------------------

def test_installed_console_script_generates(tmp_path):
    recare = Path(sys.executable).with_name("recare")
    done = subprocess.run(
        [str(recare), "generate", "--prompt", "a cat", *TINY_ARGS, "--output-dir", str(tmp_path), "--json"],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"output_dir": str(tmp_path), "generated": 1, "skipped": 0, "total": 1}
    assert (tmp_path / "a_cat_0.png").is_file()


def test_python_dash_m_reports_errors_in_one_line(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "recare_cli", "generate", "--output-dir", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.startswith("Error: no prompt given — pass --prompt TEXT")
    assert len(done.stderr.splitlines()) == 1
    assert not (tmp_path / "out").exists()
