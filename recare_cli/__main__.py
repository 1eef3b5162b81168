"""`recare` and `python -m recare_cli`: the entry point, which imports nothing heavy.

`main` installs the Ctrl-C handling before the CLI (typer, rich, then torch and diffusers) is
imported, so an interrupt that lands while those load is reported like any other.
"""

from __future__ import annotations

import signal
import sys

from recare_cli.errors import INTERRUPT_MESSAGE, INTERRUPTED, on_sigint, on_unraisable, was_interrupted


def main() -> None:
    """Run recare; every Ctrl-C, whenever it lands, is exit 130 with one line on stderr."""
    signal.signal(signal.SIGINT, on_sigint)
    sys.unraisablehook = on_unraisable
    try:
        from recare_cli.cli.app import app

        code = app(prog_name="recare", standalone_mode=False)
    except KeyboardInterrupt:  # before the app's own handler runs, or while it reports something else
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        sys.stderr.write(f"Error: {INTERRUPT_MESSAGE}\n")
        code = INTERRUPTED
    # A late Ctrl-C must not turn a finished command into a traceback while Python shuts down.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if was_interrupted() and code == 0:  # a Ctrl-C that Python dropped after the last progress step
        sys.stderr.write(f"Error: {INTERRUPT_MESSAGE}\n")
        code = INTERRUPTED
    sys.stderr.flush()
    sys.exit(code)


if __name__ == "__main__":
    main()
