"""bench/frontier_summary.py: the README's matched-erasure table is computed by these functions."""

import importlib
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def frontier():
    bench = str(ROOT / "bench")
    added = bench not in sys.path
    if added:
        sys.path.insert(0, bench)  # bench scripts import their siblings by name, as a script does
    yield importlib.import_module("frontier_summary")
    if added:
        sys.path.remove(bench)


def _point(target, care, unrelated=None):
    return {"target_common": target, "target_rare": 0.0, "care_kept": [care, care],
            "unrelated_kept": None if unrelated is None else [unrelated, unrelated]}


def test_matched_erasure_reads_the_upper_envelope_whatever_the_order(frontier):
    # Two settings at 21%: the one keeping 99% is on the envelope, the one keeping 72% is not.
    points = [_point(32, 99), _point(21, 72), _point(21, 99), _point(7, 77)]
    expected = 77 + (10 - 7) / (21 - 7) * (99 - 77)
    assert frontier.at_matched_erasure(points, "care_kept", 10.0) == pytest.approx(expected)
    assert frontier.at_matched_erasure(points[::-1], "care_kept", 10.0) == pytest.approx(expected)


def test_matched_erasure_at_or_under_the_level_and_never_reaching_it(frontier):
    # Every setting under the level: the most any of them keeps, not the weakest setting's figure.
    assert frontier.at_matched_erasure([_point(8, 90), _point(2, 95), _point(0, 60)], "care_kept", 10.0) == 95
    assert frontier.at_matched_erasure([_point(21, 99), _point(14, 49)], "care_kept", 10.0) is None
    # A figure a model lacks (no unrelated prompt had a base rate) does not count as a point.
    points = [_point(30, 100, unrelated=100), _point(5, 80, unrelated=None), _point(0, 50, unrelated=70)]
    assert frontier.at_matched_erasure(points, "unrelated_kept", 10.0) == pytest.approx(70 + 10 / 30 * 30)


def test_care_figures_count_the_given_care_set_not_the_measurements_labels(frontier):
    # Measured (labelled) with a CARE set holding red; summarised with one holding triangle instead.
    rows = [("target-common", "star", "a red star"), ("CARE", "red", "a red circle"),
            ("CARE+target", "red", "a red star"), ("unrelated", "triangle", "a triangle"),
            ("unrelated", "night", "night"), ("unrelated+target", "night", "a star in the night")]
    base = {"rates": [{"group": g, "concept": c, "prompt": p, "rate": 100.0} for g, c, p in rows]}
    rates = {"a red star": 0.0, "a red circle": 100.0, "a triangle": 25.0, "night": 50.0, "a star in the night": 50.0}
    entry = {"rates": [{"group": g, "concept": c, "prompt": p, "rate": rates[p]} for g, c, p in rows]}

    summary = frontier.summarise(entry, base, ["triangle", "night"])

    assert summary["care_kept"] == [pytest.approx(125 / 3), 25.0]  # triangle 25, night 50 and 50
    assert summary["care_per_concept"] == {"triangle": [25.0, 25.0], "night": [50.0, 50.0]}
    assert summary["care_kept_with_target"] == [50.0, 50.0]
    assert summary["unrelated_kept"] == [100.0, 100.0]  # red's own prompt, no longer CARE
    assert summary["unrelated_kept_with_target"] == [0.0, 0.0]  # "a red star"
    assert summary["night_with_target"] == [50.0, 50.0]
    assert summary["target_common"] == 0.0
