"""Command-line layer: parses arguments and prints; the work lives in the core modules.

Nothing heavy is imported here: `main` installs the Ctrl-C handling first, so an interrupt that
lands while the CLI itself is still being imported is reported like any other.
"""

from __future__ import annotations

import signal
import sys

from recare_cli.errors import INTERRUPT_MESSAGE, INTERRUPTED, on_sigint

__all__ = ["app", "main"]


def main() -> None:
    """The `recare` program: every Ctrl-C, whenever it lands, is exit 130 with one line on stderr."""
    signal.signal(signal.SIGINT, on_sigint)
    try:
        from recare_cli.cli.app import app

        code = app(prog_name="recare", standalone_mode=False)
    except KeyboardInterrupt:  # before the app's own handler runs, or while it reports something else
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        sys.stderr.write(f"Error: {INTERRUPT_MESSAGE}\n")
        code = INTERRUPTED
    # A late Ctrl-C must not turn a finished command into a traceback while Python shuts down.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.stderr.flush()
    sys.exit(code)


def __getattr__(name: str):
    if name == "app":
        from recare_cli.cli.app import app

        return app
    raise AttributeError(name)
