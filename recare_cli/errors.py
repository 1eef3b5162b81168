"""Exceptions the core raises; the CLI maps them to one-line messages and exit codes.

Exit codes (documented in the README and docs/configuration.md): 0 ok, 1 error, 2 usage, 3 model not available, 130 interrupted.
"""

import sys
from contextlib import contextmanager

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_MODEL_UNAVAILABLE = 3
INTERRUPTED = 130  # 128 + SIGINT, as shells report it


class RecareError(Exception):
    """An expected failure: bad input, a file that cannot be written, a diverged training run."""

    exit_code = EXIT_ERROR

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} ({self.hint})"


class UsageError(RecareError):
    """The arguments do not make sense together (the user must change the command line)."""

    exit_code = EXIT_USAGE


class ModelNotAvailable(RecareError):
    """A model (or classifier, CLIP weights…) is not on disk and cannot be fetched."""

    exit_code = EXIT_MODEL_UNAVAILABLE


class Interrupted(RecareError):
    """Ctrl-C: finished work (atomic files, checkpoints) stays, and a rerun continues from it."""

    exit_code = INTERRUPTED


INTERRUPT_MESSAGE = "interrupted; finished work is kept and a rerun continues from it"
_SIGINT = {"received": False}


def on_sigint(signum, frame) -> None:
    """SIGINT handler: remembers that Ctrl-C was pressed, then interrupts as Python's own handler does."""
    _SIGINT["received"] = True
    raise KeyboardInterrupt


def on_unraisable(unraisable) -> None:
    """sys.unraisablehook: a Ctrl-C that lands in a weakref callback or a finaliser (imports run
    such callbacks) is printed by Python as "Exception ignored in …" and then dropped, so the
    command would run on to the end. Keep it quiet here; `raise_if_interrupted` raises it again."""
    if isinstance(unraisable.exc_value, KeyboardInterrupt):
        _SIGINT["received"] = True
        return
    sys.__unraisablehook__(unraisable)


@contextmanager
def interrupts_held():
    """Hold Ctrl-C back until the block ends, then raise it.

    For `import torch`: a KeyboardInterrupt raised while torch's C++ start-up calls back into
    Python cannot be caught, it aborts the process (SIGABRT). Only under recare's own handler
    (the `recare` process), never under a test runner's.
    """
    import signal

    if signal.getsignal(signal.SIGINT) is not on_sigint:
        yield
        return
    signal.signal(signal.SIGINT, _remember_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, on_sigint)
    raise_if_interrupted()


def _remember_sigint(signum, frame) -> None:
    _SIGINT["received"] = True


def raise_if_interrupted() -> None:
    """Raise the Ctrl-C that Python dropped (see `on_unraisable`); progress calls this at every step."""
    if _SIGINT["received"]:
        raise KeyboardInterrupt


def was_interrupted() -> bool:
    return _SIGINT["received"]


def is_interrupt(exc: BaseException | None) -> bool:
    """Whether `exc` is Ctrl-C, also when a library wrapped it in its own error.

    diffusers' lazy imports turn a KeyboardInterrupt into "RuntimeError: Failed to import
    diffusers.pipelines…", and code cleaning up after it can raise anything; so once SIGINT has
    arrived every error counts as the interrupt, and otherwise the exception's chain is searched.
    """
    if _SIGINT["received"]:
        return True
    seen: set[int] = set()
    pending = [exc]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        if isinstance(current, (KeyboardInterrupt, Interrupted)):
            return True
        seen.add(id(current))
        pending += [current.__cause__, current.__context__]
    return False
