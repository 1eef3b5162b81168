"""Exceptions the core raises; the CLI maps them to one-line messages and exit codes.

Exit codes (documented in the README): 0 ok, 1 error, 2 usage, 3 model not available, 130 interrupted.
"""

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
