"""completions/* and docs/cli.md are generated from the live CLI; these tests fail when they are stale."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

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


# README.md and docs/: the front door, links, commands as written, the site -----------------------

README = REPO_ROOT / "README.md"
DOCS = REPO_ROOT / "docs"
README_SECTIONS = ["Set up", "A typical session", "Commands", "Supported models", "Results", "Exit codes and errors",
                   "Read more"]
MAIN_JOB_GRID = DOCS / "images" / "main-job-grid.png"


def _code_blocks(text: str, language: str = "bash") -> list[str]:
    import re

    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.S | re.M)


def _documents() -> list[Path]:
    """README.md and every page of the site, but not the generated command reference."""
    return [README] + sorted(p for p in DOCS.rglob("*.md") if p != REPO_ROOT / devtools.DOCS_FILE)


def test_readme_starts_with_the_two_setup_commands_ci_runs():
    text = README.read_text(encoding="utf-8")
    headings = [line[3:] for line in text.splitlines() if line.startswith("## ")]
    assert headings == README_SECTIONS
    main_job, tests = [block.strip() for block in _code_blocks(text)[:2]]
    ci = [line for line in (REPO_ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines() if line.strip()][-1]
    assert tests == ci.strip()
    assert main_job.startswith("python3 -m venv .venv && . .venv/bin/activate && pip install -e . && "
                               "recare erase --model toy --concept star ")
    assert "&& recare eval --model toy --unet runs/star --compare base --metric toy" in main_job
    assert text.index(main_job) < text.index(tests) < text.index("## A typical session")


def test_readme_is_a_short_front_door_with_the_main_jobs_picture():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 200
    # The picture is the main job's eval grid, and the README says how to regenerate it from that job.
    main_job = _code_blocks(text)[0]
    assert "--output-dir runs/star-eval" in main_job and "--no-grid" not in main_job
    assert f"]({MAIN_JOB_GRID.relative_to(REPO_ROOT)})" in text
    assert f"cp runs/star-eval/grid.png {MAIN_JOB_GRID.relative_to(REPO_ROOT)}" in text
    with Image.open(MAIN_JOB_GRID) as picture:
        assert picture.format == "PNG" and picture.width >= 800
    assert MAIN_JOB_GRID.stat().st_size < 1_000_000


def _slug(heading: str) -> str:
    """Python-Markdown's toc anchor of a heading (what mkdocs links to)."""
    import re
    import unicodedata

    text = re.sub(r"[`*]", "", heading)
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def test_every_relative_link_and_anchor_resolves():
    import re

    for document in _documents():
        text = document.read_text(encoding="utf-8")
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            resolved = (document.parent / path).resolve() if path else document
            assert resolved.exists(), f"{document.relative_to(REPO_ROOT)} links to missing {target}"
            if anchor and resolved.suffix == ".md":
                headings = [line.lstrip("#").strip() for line in resolved.read_text(encoding="utf-8").splitlines()
                            if line.startswith("#")]
                assert anchor in {_slug(h) for h in headings}, f"{document.relative_to(REPO_ROOT)}: no #{anchor} in {path}"


def _recare_commands(block: str) -> list[list[str]]:
    """The `recare …` command lines of a bash block, as argument lists (after `-m recare_cli` too)."""
    import shlex

    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        lexer.commenters = "#"
        segment: list[str] = []
        for token in list(lexer) + [";"]:
            if token and set(token) <= set(";&|"):
                if segment and segment[0] == "recare":
                    commands.append(segment[1:])
                elif "recare_cli" in segment and segment[segment.index("recare_cli") - 1] == "-m":
                    commands.append(segment[segment.index("recare_cli") + 1:])
                segment = []
            else:
                segment.append(token)
    return commands


def _parse(root, args: list[str]) -> None:
    """Parse a command line as the CLI would, down to the subcommand, without running it."""
    def remaining(ctx) -> list[str]:  # typer's own click keeps a group's subcommand in _protected_args
        return list(getattr(ctx, "_protected_args", [])) + list(ctx.args)

    ctx = root.make_context("recare", list(args))
    command, rest = root, remaining(ctx)
    while hasattr(command, "resolve_command") and rest:
        name, command, rest = command.resolve_command(ctx, rest)
        ctx = command.make_context(name, rest, parent=ctx)
        rest = remaining(ctx)
    assert not hasattr(command, "resolve_command") or command.invoke_without_command, f"`{' '.join(args)}` names no command"
    assert not rest, f"unexpected arguments {rest}"


def test_every_documented_command_parses_as_written():
    import typer.main

    from recare_cli.cli.app import app

    root = typer.main.get_command(app)
    checked = 0
    for document in _documents():
        for block in _code_blocks(document.read_text(encoding="utf-8")):
            for args in _recare_commands(block):
                try:
                    _parse(root, args)
                except Exception as exc:  # noqa: BLE001 - name the page and the command
                    raise AssertionError(f"{document.relative_to(REPO_ROOT)}: `recare {' '.join(args)}`: {exc}") from exc
                checked += 1
    assert checked >= 40  # the README and every guide show commands


def test_every_docs_page_is_in_the_site_navigation():
    nav = (REPO_ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    for page in DOCS.rglob("*.md"):
        assert f": {page.relative_to(DOCS).as_posix()}\n" in nav, f"{page.relative_to(REPO_ROOT)} is not in mkdocs.yml's nav"


def test_the_site_builds_strictly(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("material")
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(REPO_ROOT / "mkdocs.yml"),
         "--site-dir", str(tmp_path / "site")],
        env=_env(NO_MKDOCS_2_WARNING="1"), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "site" / "guides" / "erase-nudity" / "index.html").is_file()
