"""Eval metrics against hand-computed values, the documented matching rules, and the bootstrap."""

from __future__ import annotations

import math

import numpy as np
import pytest
from medpruner.eval import metrics as m

OPTIONS = {"A": "Liver", "B": "Left kidney", "C": "Kidney", "D": "Spleen"}


@pytest.mark.parametrize(
    "prediction, choice",
    [
        ("B", "B"), ("(b)", "B"), ("B.", "B"), (" [C] ", "C"),
        ("B. Left kidney", "B"), ("(D) spleen", "D"), ("d: spleen", "D"), ("a) liver", "A"),
        ("The answer is C.", "C"), ("Answer: d", "D"), ("I pick option A here", "A"),
        ("liver", "A"), ("  SPLEEN!! ", "D"), ("It is in the left kidney.", "B"),
        ("the kidney", "C"), ("liver or spleen", None), ("a cyst", None), ("E", None), ("", None),
        ("The lesion is in the liver", "A"),
    ],
)
def test_extract_choice_follows_the_documented_rules(prediction, choice):
    assert m.extract_choice(prediction, OPTIONS) == choice


def test_closed_accuracy_with_letter_or_text_gold():
    assert m.closed_accuracy("Spleen", OPTIONS, "D") == 1.0
    assert m.closed_accuracy("C", OPTIONS, "d") == 0.0
    assert m.closed_accuracy("D", OPTIONS, None, answer="spleen") == 1.0
    assert m.closed_accuracy("no idea", OPTIONS, "A") == 0.0
    assert m.closed_accuracy("B", {}, "B") == 1.0  # letters only (no option texts in the data)
    with pytest.raises(ValueError, match="gold option"):
        m.closed_accuracy("A", OPTIONS, None, answer="pancreas")


def test_normalisation():
    assert m.normalize_answer("  The  Liver's\tlobe—LEFT. ") == "the liver s lobe left"
    assert m.exact_match("Left kidney.", "left  KIDNEY") == 1.0
    assert m.exact_match("kidney", "left kidney") == 0.0


def test_token_f1_hand_computed():
    # prediction 4 tokens, reference 3, common {the, liver} -> P = 2/4, R = 2/3, F1 = 4/7
    assert m.token_f1("the liver is enlarged", "the liver lesion") == pytest.approx(4 / 7)
    # repeated tokens count by multiplicity: common = min(3, 1) = 1 -> P = 1/3, R = 1, F1 = 1/2
    assert m.token_f1("mass mass mass", "mass") == pytest.approx(0.5)
    assert m.token_f1("", "") == 1.0 and m.token_f1("x", "") == 0.0 and m.token_f1("a b", "c d") == 0.0


def test_bleu_hand_computed():
    assert m.bleu("the cat sat on the mat", "the cat sat on the mat") == pytest.approx(1.0)
    # n-gram precisions 5/6, 3/5, 2/4, 1/3, same length (no brevity penalty): (1/12)^(1/4)
    assert m.bleu("the cat sat on a mat", "the cat sat on the mat") == pytest.approx((1 / 12) ** 0.25, abs=1e-6)
    # a 4-token prefix of a 6-token reference: every precision 1, brevity penalty exp(1 - 6/4)
    assert m.bleu("the cat sat on", "the cat sat on the mat") == pytest.approx(math.exp(1 - 6 / 4), abs=1e-6)


def test_rouge_l_hand_computed():
    # LCS("the cat on the mat", "the cat sat on the mat") = 5: P = 5/5, R = 5/6, F = 10/11
    assert m.rouge_l("the cat on the mat", "the cat sat on the mat") == pytest.approx(10 / 11)
    assert m.rouge_l("mat the", "the mat") == pytest.approx(0.5)  # LCS 1 of 2 each way


def test_optional_metrics_are_reported_unavailable_not_zero():
    status = m.optional_metrics()
    assert set(status) == {"meteor", "bertscore"}
    for reason in status.values():
        assert reason is None or reason.startswith("unavailable")
    summary = m.summarize([{"category": "x", "metrics": {"exact_match": 1.0}}], unavailable=status)
    assert "bertscore" not in summary["overall"] and "meteor" not in summary["overall"]
    assert summary["unavailable"] == {k: v for k, v in status.items() if v}


def test_score_answer_picks_closed_or_open():
    assert m.score_answer("B", answer="Left kidney", options=OPTIONS, answer_letter="B") == {"accuracy": 1.0}
    open_scores = m.score_answer("left kidney", answer="Left kidney.")
    assert set(open_scores) == set(m.OPEN_METRICS)
    assert open_scores["exact_match"] == 1.0 and open_scores["token_f1"] == 1.0


def test_bootstrap_matches_a_loop_reference():
    values = [1.0, 0.0, 1.0, 1.0, 0.0, 0.5, 0.25]
    low, high = m.bootstrap_ci(values, resamples=500, confidence=0.9, seed=4)
    rng = np.random.default_rng(4)
    means = []
    for _ in range(500):
        draw = rng.integers(0, len(values), size=len(values))
        means.append(sum(values[i] for i in draw) / len(values))
    means.sort()

    def quantile(q):  # linear interpolation between order statistics
        position = q * (len(means) - 1)
        below = math.floor(position)
        return means[below] + (position - below) * (means[min(below + 1, len(means) - 1)] - means[below])

    assert low == pytest.approx(quantile(0.05)) and high == pytest.approx(quantile(0.95))
    assert low <= sum(values) / len(values) <= high


def test_bootstrap_width_follows_the_normal_approximation():
    rng = np.random.default_rng(0)
    values = (rng.random(2000) < 0.3).astype(float)
    low, high = m.bootstrap_ci(values, resamples=2000, seed=1)
    p = values.mean()
    expected = 2 * 1.96 * math.sqrt(p * (1 - p) / values.size)
    assert high - low == pytest.approx(expected, rel=0.1)
    assert m.bootstrap_ci([0.7] * 9) == pytest.approx((0.7, 0.7))
    assert m.bootstrap_ci([]) is None
    assert m.bootstrap_ci(values, seed=1) == m.bootstrap_ci(values, seed=1) != m.bootstrap_ci(values, seed=2)
    for bad in (dict(resamples=0), dict(confidence=1.0)):
        with pytest.raises(ValueError):
            m.bootstrap_ci(values, **bad)


def test_summarize_per_category():
    rows = [
        {"category": "organ", "metrics": {"accuracy": 1.0}},
        {"category": "organ", "metrics": {"accuracy": 0.0}},
        {"category": "plane", "metrics": {"accuracy": 1.0}},
        {"category": "plane", "metrics": {"token_f1": 0.5, "bleu": 0.25}},
    ]
    summary = m.summarize(rows, resamples=200)
    assert summary["overall"]["accuracy"]["mean"] == pytest.approx(2 / 3)
    assert summary["overall"]["accuracy"]["n"] == 3
    assert summary["by_category"]["organ"]["accuracy"]["mean"] == 0.5
    assert summary["by_category"]["plane"]["token_f1"] == {"mean": 0.5, "ci_low": 0.5, "ci_high": 0.5, "n": 1}
    organ = summary["by_category"]["organ"]["accuracy"]
    assert 0.0 <= organ["ci_low"] <= 0.5 <= organ["ci_high"] <= 1.0
