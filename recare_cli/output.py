"""The one place that owns output modes (human / --json / --quiet) and progress bars.

The core never prints: it reports through a `Reporter`. Human mode draws rich progress bars and
messages on stderr and tables on stdout; JSON mode writes one JSON object per line on stdout
(results and events) and keeps stderr for warnings; quiet mode
prints no results (the files are the result), only warnings on stderr.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from rich.console import Console

from recare_cli.errors import raise_if_interrupted

HUMAN, JSON, QUIET = "human", "json", "quiet"


class Task:
    """Handle of one progress bar; a no-op when the reporter draws no bars."""

    def __init__(self, progress=None, task_id=None):
        self._progress = progress
        self._task_id = task_id
        self.completed = 0

    def advance(self, n: int = 1, **fields: Any) -> None:
        raise_if_interrupted()
        self.completed += n
        if self._progress is not None:
            status = "  ".join(f"{k} {_fmt(v)}" for k, v in fields.items())
            self._progress.update(self._task_id, advance=n, status=status)

    def set_completed(self, n: int) -> None:
        raise_if_interrupted()
        self.completed = n
        if self._progress is not None:
            self._progress.update(self._task_id, completed=n)


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class Reporter:
    def __init__(self, mode: str = QUIET, stdout=None, stderr=None):
        self.mode = mode
        self._stdout = stdout or sys.stdout
        self.console = Console(file=stdout or sys.stdout, soft_wrap=True)
        self.err_console = Console(file=stderr or sys.stderr, stderr=True, soft_wrap=True)
        self._progress = None
        self._open_tasks = 0

    # messages -------------------------------------------------------------------------------
    def info(self, message: str) -> None:
        if self.mode == HUMAN:
            self.err_console.print(message, highlight=False)

    def warn(self, message: str) -> None:
        self.err_console.print(f"[yellow]Warning:[/] {message}", highlight=False)

    def event(self, kind: str, **data: Any) -> None:
        """A milestone (stage started, checkpoint saved): a JSON line in JSON mode, a log line otherwise."""
        if self.mode == JSON:
            self._json_line({"event": kind, **data})
        elif self.mode == HUMAN:
            details = " ".join(f"{k}={_fmt(v)}" for k, v in data.items())
            self.err_console.print(f"[dim]{kind}[/] {details}", highlight=False)

    def result(self, data: dict, render: Callable[[Console], None] | None = None) -> None:
        """The command's answer: a JSON line, or a human rendering (a table, a summary)."""
        if self.mode == JSON:
            self._json_line(data)
        elif self.mode == HUMAN:
            if render is not None:
                render(self.console)
            else:
                for key, value in data.items():
                    self.console.print(f"{key}: {value}", highlight=False)

    def _json_line(self, data: dict) -> None:
        from recare_cli.fsutil import json_text

        self._stdout.write(json_text(data, undefined_as_null=True) + "\n")
        self._stdout.flush()

    # progress -------------------------------------------------------------------------------
    @contextmanager
    def progress(self, description: str, total: int | None) -> Iterator[Task]:
        if self.mode != HUMAN:
            yield Task()
            return
        if self._progress is None:
            self._progress = _new_progress(self.err_console)
            self._progress.start()
        task_id = self._progress.add_task(description, total=total, status="")
        self._open_tasks += 1
        try:
            yield Task(self._progress, task_id)
        finally:
            self._open_tasks -= 1
            if self._open_tasks == 0:
                self._progress.stop()
                self._progress = None
            else:
                self._progress.remove_task(task_id)


def _new_progress(console: Console):
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class RateColumn(ProgressColumn):
        def render(self, task):
            return Text(f"{task.speed:.2f}/s" if task.speed else "  -/s", style="cyan")

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
        console=console,
    )


QUIET_REPORTER = Reporter(QUIET)


# library noise ----------------------------------------------------------------------------------

# Read when each library is first imported, so setting them at command start silences it for good.
LIBRARY_ENV = {
    # Their errors too (diffusers logs "An error occurred while trying to fetch …" and then raises):
    # what fails reaches the user as recare's one Error line.
    "DIFFUSERS_VERBOSITY": "critical",
    "TRANSFORMERS_VERBOSITY": "critical",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # also transformers' "Writing model shards"
    "TQDM_DISABLE": "1",  # every other tqdm bar, e.g. diffusers' "Loading pipeline components"
}
LIBRARY_LOGGERS = ("diffusers", "transformers", "huggingface_hub", "accelerate", "torch", "PIL", "open_clip",
                   "urllib3", "filelock")
_LIBRARIES = {"verbose": False}


def quiet_libraries(verbose: bool | None = None) -> None:
    """Only recare's own lines and progress bars reach the terminal, unless --verbose.

    The one place that silences the libraries: their loggers, their tqdm bars and their Python
    warnings (torch's pickle UserWarning, PIL's DecompressionBombWarning, FutureWarnings).
    Commands call it at start with their --verbose; model loading calls it again without, keeping
    the command's choice.
    """
    if verbose is not None:
        _LIBRARIES["verbose"] = verbose
    if _LIBRARIES["verbose"]:
        return
    for name, value in LIBRARY_ENV.items():
        os.environ.setdefault(name, value)
    # recare's own warnings go through Reporter.warn, so every Python warning is a library's.
    warnings.filterwarnings("ignore")
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    # Already imported (a long-lived process, the tests): set what the environment would have.
    for name in ("diffusers", "transformers"):
        module = sys.modules.get(name)
        if module is not None and hasattr(module, "utils"):
            module.utils.logging.set_verbosity(logging.CRITICAL)
            module.utils.logging.disable_progress_bar()
    hub = sys.modules.get("huggingface_hub")
    if hub is not None:
        hub.utils.disable_progress_bars()
