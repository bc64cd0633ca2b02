"""The eval report's pictures and dataset counts (python/medpruner/eval/report.py, issue 25 item 12)."""

from __future__ import annotations

import math

import pytest
from medpruner.eval import report


def _entry(mean, retention, *, deltas=None, flips=None, agreement=None, kl=None):
    stats = {"mean": mean, "ci_low": mean - 0.05, "ci_high": mean + 0.05, "n": 100}
    entry = {
        "n": 100,
        "primary_metric": "accuracy",
        "metrics": {"overall": {"accuracy": stats}},
        "retention": {"overall": retention, "slice_stage": retention, "token_stage": 1.0, "tokens_kept": 10,
                      "slices_kept": 3},
        "budget_match": {"max_abs_gap": 0},
    }
    if deltas is not None:
        entry["audit"] = {"category_deltas": deltas, "answer_flips": flips or [],
                          "fidelity": {"answer_agreement": agreement, "first_token_kl": kl, "top1_agreement": None,
                                       "by_category": {}}}
    return entry


def _delta(category, n, reference, pruned):
    return {"category": category, "n": n, "frequency": n / 150, "reference_accuracy": reference,
            "pruned_accuracy": pruned, "delta": pruned - reference}


def _flips(category, worse, better, changed=0):
    kinds = ["correct->wrong"] * worse + ["wrong->correct"] * better + ["changed"] * changed
    return [{"sample_id": f"{category}-{i}", "category": category, "kind": kind, "reference_prediction": "a",
             "pruned_prediction": "b", "kept_slices": [0]} for i, kind in enumerate(kinds)]


@pytest.fixture
def summary():
    """Eleven methods, nine of them at one retention (the case whose labels overprinted)."""
    deltas = [_delta("ring", 50, 0.6, 0.5), _delta("cyst", 100, 0.8, 0.8)]
    methods = {"none": _entry(0.80, 1.0), "dins": _entry(0.80, 1.0, deltas=deltas, agreement=1.0, kl=0.0)}
    for i, name in enumerate(["medpruner", "iaf", "topk", "random", "visionzip", "divprune", "evs", "hiprune",
                              "uniform_slices"]):
        methods[name] = _entry(0.70 + 0.01 * i, 0.23, deltas=deltas, flips=_flips("ring", 6, 1),
                               agreement=0.9, kl=0.05)
    return {
        "model": "tiny",
        "settings_id": "abc",
        "dataset": {"file": "d.jsonl", "format": "jsonl", "rows": 160, "samples": 150, "closed": 150, "open": 0,
                    "skipped": 10, "skipped_rows": [{"row": 3, "reason": "volume not found"}],
                    "categories": {"ring": 50, "cyst": 100}},
        "methods": methods,
    }


def test_methods_are_rows_sorted_by_retention_then_metric(summary):
    rows = report._rows_by_retention(summary)
    assert rows[:2] == ["dins", "none"] or rows[:2] == ["none", "dins"]
    shared = rows[2:]
    assert len(shared) == 9 and len(set(shared)) == 9
    means = [summary["methods"][name]["metrics"]["overall"]["accuracy"]["mean"] for name in shared]
    assert means == sorted(means, reverse=True)


def test_both_plots_render_from_a_summary(summary, tmp_path):
    for name, data in [("pareto", report.plot_pareto(summary)), ("deltas", report.plot_category_deltas(summary))]:
        assert data.startswith(b"\x89PNG") and len(data) > 10_000
        (tmp_path / f"{name}.png").write_bytes(data)


def test_category_delta_interval_is_paired_from_the_flips():
    row = _delta("ring", 50, 0.6, 0.5)
    # Nothing flipped in the category: the delta is exact, as in a bootstrap over the samples.
    assert report._delta_interval(_delta("cyst", 100, 0.8, 0.8), _flips("ring", 6, 1)) == (0.0, 0.0)
    low, high = report._delta_interval(row, _flips("ring", 6, 1, changed=4))
    half = 1.96 * math.sqrt((7 / 50 - 0.1**2) / 50)
    assert low == pytest.approx(-0.1 - half) and high == pytest.approx(-0.1 + half)
    # Without the flips: the unpaired interval, wider.
    low_unpaired, high_unpaired = report._delta_interval(row, None)
    assert low_unpaired < low and high_unpaired > high
    assert report._delta_interval({**row, "ci_low": -0.3, "ci_high": 0.1}, None) == (-0.3, 0.1)


def test_report_shows_the_dataset_counts(summary):
    page = report.render_html(summary, {})
    assert "<td>rows read</td><td>160</td>" in page and "<td>rows skipped</td><td>10</td>" in page
    # Without skipped_by_reason the reasons are counted from the skipped rows.
    assert "<td>volume not found</td><td>1</td>" in page
    assert "<td>ring</td><td>50</td>" in page and "<td>cyst</td><td>100</td>" in page
    summary["dataset"]["skipped_by_reason"] = {"volume not found": 7, "no answer": 3}
    page = report.render_html(summary, {})
    assert "<td>volume not found</td><td>7</td>" in page and "<td>no answer</td><td>3</td>" in page
    assert page.index("volume not found") < page.index("no answer")
