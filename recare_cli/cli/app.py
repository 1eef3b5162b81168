"""The `recare` Typer app, and the one place that maps exceptions to messages and exit codes."""

from __future__ import annotations

import os
import sys
import traceback

import typer
from typer.core import TyperGroup

try:  # typer >= 0.2x bundles its own copy of click, whose exceptions are not click's
    from typer._click import exceptions as click_exceptions
except ImportError:  # pragma: no cover - older typer raises click's own
    from click import exceptions as click_exceptions

from recare_cli import __version__
from recare_cli.cli import cache as cache_cmd
from recare_cli.cli import careset as careset_cmd
from recare_cli.cli import erase as erase_cmd
from recare_cli.cli import eval as eval_cmd
from recare_cli.cli import export as export_cmd
from recare_cli.cli import generate as generate_cmd
from recare_cli.cli import plugins as plugins_cmd
from recare_cli.cli import toy as toy_cmd
from recare_cli.cli.common import VERBOSE
from recare_cli.errors import (
    EXIT_ERROR, EXIT_USAGE, INTERRUPT_MESSAGE, INTERRUPTED, Interrupted, RecareError, is_interrupt,
)

COMPLETE_VAR = "_RECARE_COMPLETE"


def _error_line(message: str, hint: str | None = None) -> None:
    text = f"Error: {message}" + (f" — {hint}" if hint else "")
    typer.echo(" ".join(text.split("\n")), err=True)


class RecareGroup(TyperGroup):
    """Runs every command with one exception handler, also under CliRunner in tests."""

    def _main_shell_completion(self, ctx_args, prog_name, complete_var=None):
        # completions/ holds Typer's scripts (recare_cli/devtools.py); add_completion=False means
        # Typer never registers the matching shell classes, so register them when one calls back.
        if os.environ.get(complete_var or COMPLETE_VAR):
            from typer.completion import completion_init

            completion_init()
        super()._main_shell_completion(ctx_args, prog_name, complete_var)

    def make_context(self, info_name, args, parent=None, **extra):
        # click turns a Ctrl-C during parsing into Abort after printing a blank line; report it as one.
        try:
            return super().make_context(info_name, args, parent, **extra)
        except KeyboardInterrupt:
            raise Interrupted(INTERRUPT_MESSAGE) from None

    def invoke(self, ctx):
        # Typer would turn Ctrl-C into a silent exit code; make it an error the handler below explains.
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            raise Interrupted(INTERRUPT_MESSAGE) from None

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        VERBOSE["on"] = False  # set by the command's --verbose; in-process runs must not inherit it
        try:
            result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except typer.Exit as exc:
            code = exc.exit_code
        except getattr(click_exceptions, "NoArgsIsHelpError", ()) as exc:
            if exc.format_message():  # rich help is printed while formatting; plain help comes back here
                typer.echo(exc.format_message(), err=True)
            code = EXIT_USAGE
        except click_exceptions.UsageError as exc:
            where = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx else ""
            _error_line(exc.format_message() + where)
            code = EXIT_USAGE
        except typer.Abort as exc:  # a prompt that got Ctrl-C or the end of its input
            interrupted = is_interrupt(exc)
            _error_line(INTERRUPT_MESSAGE if interrupted else "no answer to a question (its input ended)",
                        None if interrupted else "pass --yes to answer yes without asking")
            code = INTERRUPTED if interrupted else EXIT_USAGE
        except click_exceptions.ClickException as exc:  # e.g. a file argument that cannot be opened
            _error_line(exc.format_message())
            code = exc.exit_code
        except KeyboardInterrupt:
            _error_line(INTERRUPT_MESSAGE)
            code = INTERRUPTED
        except Exception as exc:  # noqa: BLE001 - the last line of defence: never a bare traceback
            if VERBOSE["on"]:
                traceback.print_exc()
            if is_interrupt(exc):  # Ctrl-C that a library wrapped in its own error
                _error_line(INTERRUPT_MESSAGE)
                code = INTERRUPTED
            elif isinstance(exc, RecareError):
                _error_line(exc.message, exc.hint)
                code = exc.exit_code
            else:
                _error_line(f"unexpected {type(exc).__name__}: {exc}",
                            None if VERBOSE["on"] else "rerun with --verbose for the traceback")
                code = EXIT_ERROR
        else:
            code = result if isinstance(result, int) else 0
        if standalone_mode:
            sys.exit(code)
        return code


app = typer.Typer(
    name="recare",
    cls=RecareGroup,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

COMMANDS = {
    "generate": generate_cmd.generate,
    "careset": careset_cmd.careset,
    "erase": erase_cmd.erase,
    "eval": eval_cmd.evaluate,
    "export": export_cmd.export,
}


def _version(value: bool) -> None:
    if value:
        typer.echo(f"recare {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """Erase a concept from a text-to-image diffusion model, keeping what co-occurs with it (ReCARE).

    Exit codes: 0 ok, 1 error, 2 usage, 3 model not available (offline, not cached), 130 interrupted (Ctrl-C,
    whenever it lands). A bad input gets a one-line message; see docs/inputs.md.
    """
    from recare_cli.config import default_map, load_config

    parameters = {name: {p.name for p in command.params} for name, command in ctx.command.commands.items()}
    ctx.default_map = default_map(load_config(), parameters)


for _name, _func in COMMANDS.items():
    app.command(_name)(_func)
app.add_typer(cache_cmd.app, name="cache")
app.add_typer(plugins_cmd.app, name="plugins")
app.add_typer(toy_cmd.app, name="toy")
