"""The results files of an eval: every metric's rows flattened, the --compare deltas, results.csv and results.json."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from recare_cli.errors import RecareError
from recare_cli.evaluate.context import Row
from recare_cli.fsutil import write_json, write_text
from recare_cli.manifest import Writer

RESULTS_CSV = "results.csv"
RESULTS_JSON = "results.json"
EVAL = Writer("eval")
DELTA = "delta"
RESERVED_COLUMNS = ("metric", "model")


def check_rows(metric: str, rows) -> list[Row]:
    """A plugin's mistake is reported as its mistake, not as a crash in recare."""
    if not isinstance(rows, list) or not all(isinstance(r, Row) for r in rows):
        raise RecareError(f"metric '{metric}' returned {type(rows).__name__}, not a list of Row",
                          hint="see the metric contract in recare_cli/evaluate/__init__.py")
    for row in rows:
        clash = ({*row.key} & {*row.values}) | ({*row.key, *row.values} & {*RESERVED_COLUMNS, "detail"})
        if clash:
            raise RecareError(f"metric '{metric}' returned a row with clashing column(s) {', '.join(sorted(clash))}")
    return rows


def flatten(metric: str, label: str, row: Row) -> dict:
    return {"metric": metric, "model": label, **row.key, **row.values, "detail": row.detail,
            "_key": tuple(row.key), "_values": tuple(row.values)}


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def deltas(records: list[dict], label: str, base_label: str, delta_label: str = DELTA) -> list[dict]:
    """For rows measured on both models with the same key: each number's change, model minus base."""
    def identity(record):
        return record["metric"], tuple((k, record[k]) for k in record["_key"])

    base = {identity(r): r for r in records if r["model"] == base_label}
    found = []
    for record in records:
        other = base.get(identity(record)) if record["model"] == label else None
        if other is None:
            continue
        changes = {k: record[k] - other[k] for k in record["_values"]
                   if _is_number(record[k]) and _is_number(other.get(k))}
        found.append({"metric": record["metric"], "model": delta_label, **{k: record[k] for k in record["_key"]},
                      **changes, "detail": record["detail"], "_key": record["_key"], "_values": tuple(changes)})
    return found


def public(record: dict) -> dict:
    return {k: v for k, v in record.items() if not k.startswith("_")}


def columns(records: list[dict]) -> tuple[list[str], list[str]]:
    """(key columns, value columns) in order of first appearance."""
    keys = dict.fromkeys(k for r in records for k in r["_key"])
    values = dict.fromkeys(v for r in records for v in r["_values"])
    return list(keys), list(values)


def write_results(output_dir: Path, records: list[dict], run: dict) -> list[str]:
    key_cols, value_cols = columns(records)
    header = [*RESERVED_COLUMNS, *key_cols, *value_cols, "detail"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=header, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for record in records:
        writer.writerow({**{k: "" for k in header}, **public(record), "detail": int(record["detail"])})
    csv_path, json_path = Path(output_dir) / RESULTS_CSV, Path(output_dir) / RESULTS_JSON
    write_text(csv_path, buffer.getvalue())
    # A metric can be undefined (a FID of too few images): null in JSON, empty in the CSV.
    write_json(json_path, EVAL.stamp({**run, "results": [public(r) for r in records]}), undefined_as_null=True)
    return [str(csv_path), str(json_path)]
