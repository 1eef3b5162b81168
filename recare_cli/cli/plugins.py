"""`recare plugins`: which concept types, metrics, methods and attacks are installed, and from where."""

from __future__ import annotations

from typing import Annotated

import typer

from recare_cli.output import HUMAN, JSON, Reporter

app = typer.Typer(help="Show the plugins that add concept types, metrics, methods and attacks.", no_args_is_help=True)

JsonOption = Annotated[bool, typer.Option("--json", help="JSON lines on stdout.")]


@app.command("list")
def list_plugins(json_output: JsonOption = False) -> None:
    """List every plugin, built-in or installed: its package, version and what it registers.

    Plugins are entry points in the groups recare.concept_types, recare.metrics,
    recare.methods and recare.attacks. RECARE_LOAD_PLUGINS=a,b loads only the named plugins or packages;
    RECARE_STRICT_PLUGINS=1 makes a plugin that fails to load an error instead of a warning.
    """
    from recare_cli.plugins import GROUPS, registry

    reg = registry()
    plugins = [
        {"name": p.name, "group": p.group, "package": p.source, "version": p.version,
         "registers": p.registered, "error": p.error}
        for p in reg.plugins
    ]

    def render(console) -> None:
        from rich.table import Table
        from rich.text import Text

        table = Table("plugin", "package", "version", "adds", "registers")
        for p in plugins:
            # Text, not markup: error messages and plugin names may contain [brackets].
            registers = (Text(", ".join(p["registers"])) if p["error"] is None
                         else Text(f"failed: {p['error']}", style="red"))
            table.add_row(Text(p["name"]), Text(p["package"]), Text(p["version"] or "?"), GROUPS[p["group"]],
                          registers)
        console.print(table)

    Reporter(JSON if json_output else HUMAN).result(
        {"plugins": plugins, **{kind: sorted(getattr(reg, kind)) for kind in GROUPS.values()}},
        render=render,
    )
