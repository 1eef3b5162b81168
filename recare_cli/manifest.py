"""Run records: every command that writes one owns its output folder, and never writes over another's.

A run record (recare-run.json, eval's results.json, careset.report.json, toy.json) says what made
the folder's files; `erase` resumes from its record and `export`/`generate --unet` read it. So a
command refuses (exit 2) an output folder holding a record that another command, or another
erase run, wrote. A rerun of the same command (and the same erase run) is fine: that is how
runs resume. The check reads small JSON files only, so commands make it before loading a model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from recare_cli.errors import UsageError

RUN_RECORD = "recare-run.json"  # erase's and generate's record
WRITTEN_BY = "written_by"
# record file -> the command that wrote it when the record predates WRITTEN_BY (None: read its fields)
RECORDS = {RUN_RECORD: None, "results.json": "eval", "careset.report.json": "careset", "toy.json": "toy train"}


@dataclass(frozen=True)
class Writer:
    command: str  # the subcommand, e.g. "erase"
    run: str | None = None  # erase's run hash; None where any run of the command may continue the folder

    def describe(self) -> str:
        return f"`recare {self.command}`" + (f" (run {self.run})" if self.run else "")

    def stamp(self, record: dict) -> dict:
        """`record` with this writer noted in it."""
        return {**record, WRITTEN_BY: {"command": self.command, "run": self.run}}


def writer_of(record, name: str) -> Writer | None:
    """Who wrote the record file `name` holding `record`; None when it is not one of recare's records."""
    if not isinstance(record, dict):
        return None
    written = record.get(WRITTEN_BY)
    if isinstance(written, dict) and isinstance(written.get("command"), str):
        return Writer(written["command"], written.get("run"))
    if RECORDS.get(name) is not None:
        return Writer(RECORDS[name])
    if "run_hash" in record and "method" in record:
        return Writer("erase", record["run_hash"])
    if record.get("command") == "generate":
        return Writer("generate")
    return None


def claim(folder: str | Path, writer: Writer, flag: str = "--output-dir") -> None:
    """Refuse (UsageError) to write into `folder` when a record there belongs to another command or run."""
    folder = Path(folder)
    for name in RECORDS:
        path = folder / name
        if not path.is_file():
            continue
        try:
            owner = writer_of(json.loads(path.read_text(encoding="utf-8")), name)
        except (OSError, ValueError):
            owner = None
        same_run = writer.run is None or owner is None or owner.run is None or owner.run == writer.run
        if owner is not None and owner.command == writer.command and same_run:
            continue
        by = owner.describe() if owner is not None else "another program"
        raise UsageError(
            f"{flag} '{folder}' holds {name} written by {by}; `recare {writer.command}` will not write over it",
            hint=f"pick another {flag}",
        )
