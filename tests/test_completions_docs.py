"""completions/* and docs/cli.md are generated from the live CLI; these tests fail when they are stale."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from recare_cli import devtools

REPO_ROOT = Path(__file__).resolve().parent.parent
BIN_DIR = Path(sys.executable).parent  # where the venv's `recare` script lives


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PATH": f"{BIN_DIR}{os.pathsep}{os.environ['PATH']}", **extra}


def test_committed_completions_and_docs_are_current(tmp_path):
    devtools.write_generated(tmp_path)
    for rel in devtools.generated_files():
        committed = REPO_ROOT / rel
        assert committed.is_file(), f"{rel} is missing: run `python -m recare_cli.devtools regen`"
        assert committed.read_text(encoding="utf-8") == (tmp_path / rel).read_text(encoding="utf-8"), (
            f"{rel} is stale: run `python -m recare_cli.devtools regen`")


def test_regen_check_reports_a_stale_file_and_regen_fixes_it(tmp_path, capsys):
    assert devtools.main(["regen", "--root", str(tmp_path)]) == 0
    assert devtools.main(["regen", "--check", "--root", str(tmp_path)]) == 0
    docs = tmp_path / devtools.DOCS_FILE
    docs.write_text(docs.read_text(encoding="utf-8").replace("recare generate", "recare gen"), encoding="utf-8")
    (tmp_path / devtools.COMPLETION_FILES["fish"]).unlink()

    assert devtools.main(["regen", "--check", "--root", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert f"stale: {devtools.DOCS_FILE}" in err and f"stale: {devtools.COMPLETION_FILES['fish']}" in err
    assert devtools.main(["regen", "--root", str(tmp_path)]) == 0
    assert devtools.stale_files(tmp_path) == []


def test_docs_cover_every_command_and_option():
    import typer.main

    from recare_cli.cli.app import app

    docs = devtools.cli_markdown()
    root = typer.main.get_command(app)
    for name, command in root.commands.items():
        assert f"## `recare {name}`" in docs
        for param in command.params:
            for flag in param.opts:
                if flag.startswith("-"):
                    assert f"{flag}" in docs, f"recare {name} {flag} is not in docs/cli.md"


def _bash_complete(words: str, cword: int) -> list[str]:
    script = REPO_ROOT / devtools.COMPLETION_FILES["bash"]
    # Mimic what bash does on <TAB>: set COMP_WORDS/COMP_CWORD and call the registered function.
    program = (f'source "{script}"; COMP_WORDS=({words}); COMP_CWORD={cword}; '
               '_recare_completion recare; printf "%s\\n" "${COMPREPLY[@]}"')
    done = subprocess.run(["bash", "--norc", "-c", program], env=_env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
def test_bash_script_completes_commands_options_and_values():
    assert "plugins" in _bash_complete("recare pl", 1)
    assert _bash_complete("recare plugins l", 2) == ["list"]
    assert "--device" in _bash_complete("recare generate --dev", 2)
    assert _bash_complete("recare generate --device c", 3) == ["cpu", "cuda"]


@pytest.mark.parametrize("shell, extra", [
    ("zsh", {"_TYPER_COMPLETE_ARGS": "recare generate --dev"}),
    ("fish", {"_TYPER_COMPLETE_ARGS": "recare generate --dev", "_TYPER_COMPLETE_FISH_ACTION": "get-args"}),
])
def test_zsh_and_fish_callbacks_answer(shell, extra):
    """What the zsh and fish scripts run on <TAB> (the shells themselves need not be installed)."""
    script = (REPO_ROOT / devtools.COMPLETION_FILES[shell]).read_text(encoding="utf-8")
    assert f"_RECARE_COMPLETE=complete_{shell}" in script
    done = subprocess.run(["recare"], env=_env(_RECARE_COMPLETE=f"complete_{shell}", **extra),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "--device" in done.stdout


def test_completion_and_help_do_not_import_torch():
    # Completion runs on every <TAB>: it must stay as light as `recare --help`.
    program = (
        "import os, sys\n"
        "from recare_cli.cli import main\n"
        "for env in ({'_RECARE_COMPLETE': 'complete_bash', 'COMP_WORDS': 'recare generate --', 'COMP_CWORD': '2'},"
        " {'_RECARE_COMPLETE': ''}):\n"
        "    os.environ.update(env)\n"
        "    sys.argv = ['recare', '--help']\n"
        "    try:\n"
        "        main()\n"
        "    except SystemExit as exc:\n"
        "        assert not exc.code, exc.code\n"
        "print('torch' in sys.modules, 'diffusers' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", program], env=_env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "False False"
