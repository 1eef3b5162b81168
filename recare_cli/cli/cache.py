"""`recare cache`: where recare's cache is, what it holds, and clearing it."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from recare_cli.output import HUMAN, JSON, Reporter

app = typer.Typer(help="Show or clear recare's cache (built-in models, CLIP vocabularies, erased models).",
                  invoke_without_command=True)

CacheDirOption = Annotated[Optional[Path], typer.Option(help="Cache folder.", envvar="RECARE_CACHE_DIR")]
JsonOption = Annotated[bool, typer.Option("--json", help="JSON lines on stdout.")]


def _human_size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


@app.callback()
def show(ctx: typer.Context, cache_dir: CacheDirOption = None, json_output: JsonOption = False) -> None:
    """Show where the cache is and what is in it."""
    if ctx.invoked_subcommand is not None:
        return
    from recare_cli.cache import cache_root, list_entries

    root = cache_root(cache_dir)
    entries = list_entries(root)
    reporter = Reporter(JSON if json_output else HUMAN)

    def render(console) -> None:
        from rich.table import Table

        console.print(f"recare cache: {root}")
        table = Table("section", "name", "size")
        for e in entries:
            table.add_row(e.section, e.name, _human_size(e.size_bytes))
        console.print(table if entries else "(empty)")
        console.print(f"total {_human_size(sum(e.size_bytes for e in entries))}")

    reporter.result(
        {"cache_dir": str(root), "total_bytes": sum(e.size_bytes for e in entries),
         "entries": [{"section": e.section, "name": e.name, "size_bytes": e.size_bytes} for e in entries]},
        render=render,
    )


@app.command()
def clear(
    name: Annotated[Optional[str], typer.Argument(help="Only this entry.")] = None,
    section: Annotated[Optional[str], typer.Option(help="Only this section: models, clip or erased.")] = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    cache_dir: CacheDirOption = None,
    json_output: JsonOption = False,
) -> None:
    """Delete cache entries (everything, one section, or one entry).

    Asks first, on stderr; declining deletes nothing and exits 1. Without a terminal to ask on
    (a script, a pipe) it refuses with exit 2 unless --yes is given.
    """
    from recare_cli.cache import cache_root, clear as clear_entries
    from recare_cli.errors import RecareError, UsageError

    root = cache_root(cache_dir)
    what = name or (f"section '{section}'" if section else "everything")
    if not yes:
        if not sys.stdin.isatty():
            raise UsageError(f"not deleting {what} from {root}: there is no terminal to confirm on",
                             hint="pass --yes to delete without asking")
        # The question goes to stderr: stdout carries only results (and JSON with --json). Not
        # typer.confirm: click's prompt writes a stray space to stdout even with err=True.
        sys.stderr.write(f"Delete {what} from {root}? [y/N]: ")
        sys.stderr.flush()
        if sys.stdin.readline().strip().lower() not in ("y", "yes"):
            raise RecareError(f"not confirmed: nothing was deleted from {root}")
    removed = clear_entries(root, section, name)
    Reporter(JSON if json_output else HUMAN).result(
        {"removed": [f"{e.section}/{e.name}" for e in removed],
         "freed_bytes": sum(e.size_bytes for e in removed)},
        render=lambda c: c.print(f"removed {len(removed)} entries, freed "
                                 f"{_human_size(sum(e.size_bytes for e in removed))}"),
    )
