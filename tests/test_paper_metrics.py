"""The published evaluation's report metrics (``--metrics paper``) against values computed by hand from
the rules in medpruner/eval/paper_metrics.py, and BLEU against nltk's ``sentence_bleu`` (what the
published script calls) on random token sequences."""

from __future__ import annotations

import math
import sys
import warnings

import numpy as np
import pytest
from medpruner.eval.metrics import score_answer
from medpruner.eval.paper_metrics import (
    PAPER_METRICS,
    paper_bleu,
    paper_rouge_l,
    paper_rouge_n,
    paper_scores,
    paper_tokens,
)

PREDICTION = "the liver is normal."
REFERENCE = "the liver is enlarged."


def test_tokens_split_periods_and_single_spaces_only():
    assert paper_tokens("The Liver.  Is\nnormal, ok.") == ["the", "liver", ".", "is\nnormal,", "ok", "."]
    assert paper_tokens("") == []


def test_bleu_by_hand():
    # tokens: the liver is normal . / the liver is enlarged .  (5 each: no brevity penalty)
    predicted, expected = paper_tokens(PREDICTION), paper_tokens(REFERENCE)
    assert paper_bleu(predicted, expected, 1) == pytest.approx(4 / 5)
    assert paper_bleu(predicted, expected, 2) == pytest.approx(math.sqrt(4 / 5 * 2 / 4))
    assert paper_bleu(predicted, expected, 3) == pytest.approx((4 / 5 * 2 / 4 * 1 / 3) ** (1 / 3))
    # no 4-gram matches: the smallest float stands in for the zero precision, so ~0 and not an error
    four = paper_bleu(predicted, expected, 4)
    assert 0 < four < 1e-70
    assert four == pytest.approx(math.exp((math.log(4 / 5 * 2 / 4 * 1 / 3) + math.log(sys.float_info.min)) / 4))
    # brevity: 2 predicted tokens against 5 -> exp(1 - 5 / 2); clipping: "the the" matches one "the"
    assert paper_bleu(["the", "liver"], expected, 1) == pytest.approx(math.exp(1 - 5 / 2))
    assert paper_bleu(["the", "the"], expected, 1) == pytest.approx(1 / 2 * math.exp(1 - 5 / 2))
    assert paper_bleu(["kidney"], expected, 1) == 0.0 and paper_bleu([], expected, 2) == 0.0


def test_bleu_equals_nltk_sentence_bleu_on_random_sequences():
    from nltk.translate.bleu_score import sentence_bleu

    rng = np.random.default_rng(0)
    words = ["liver", "kidney", "normal", "lesion", ".", "the", "no", "mass"]
    for _ in range(200):
        predicted = list(rng.choice(words, rng.integers(1, 14)))
        expected = list(rng.choice(words, rng.integers(1, 14)))
        for order in (1, 2, 3, 4):
            weights = [1 / order] * order
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                truth = sentence_bleu([expected], predicted, weights=weights)
            assert paper_bleu(predicted, expected, order) == pytest.approx(truth, rel=1e-9, abs=1e-300)


def test_rouge_by_hand():
    # words: the liver is normal / the liver is enlarged ("." ends the one sentence)
    assert paper_rouge_n(PREDICTION, REFERENCE, 1) == pytest.approx(2 * (3 / 4) ** 2 / (3 / 2 + 1e-8))
    assert paper_rouge_n(PREDICTION, REFERENCE, 2) == pytest.approx(2 * (2 / 3) ** 2 / (4 / 3 + 1e-8))
    assert paper_rouge_l(PREDICTION, REFERENCE) == pytest.approx(0.75, abs=1e-8)
    # distinct n-grams: "a a a" against "a" has one distinct unigram on each side
    assert paper_rouge_n("a a a", "a", 1) == pytest.approx(2 / (2 + 1e-8))
    # bigrams run across sentence ends: "a. b" holds the bigram (a, b)
    assert paper_rouge_n("a. b", "a b", 2) == pytest.approx(2 / (2 + 1e-8))
    assert paper_rouge_n("", REFERENCE, 1) == 0.0 and paper_rouge_l(".", REFERENCE) == 0.0


def test_rouge_l_union_follows_the_tie_rule():
    # predicted sentences "b a" and "b" against the reference "a b": each LCS has one word; the trace
    # steps in the prediction on ties, so both LCSs are "b": the union holds 1 of 2 distinct words
    assert paper_rouge_l("b a. b", "a b") == pytest.approx(2 * 0.25 / (1 + 1e-8))
    # the union spans reference sentences: "a" from the first, "b" from the second
    assert paper_rouge_l("a b", "a. b") == pytest.approx(2 / (2 + 1e-8))


def test_scores_strip_report_labels_and_score_empty_as_zero():
    scores = paper_scores("Findings: the liver is normal. Impression: normal.", "the liver is normal. normal.")
    # " the liver is normal.  normal." -> the same tokens as the reference
    assert set(scores) == set(PAPER_METRICS)
    assert scores["bleu4"] == pytest.approx(1.0) and scores["rouge1"] == pytest.approx(1.0, abs=1e-8)
    assert paper_scores("Findings:Impression:", REFERENCE) == dict.fromkeys(PAPER_METRICS, 0.0)
    # the labels are removed as written (case-sensitive), from the prediction only
    lower = paper_scores("findings: the liver is enlarged.", REFERENCE)
    assert lower["bleu1"] == pytest.approx(5 / 6)
    # ROUGE sees at most 2048 characters of the prediction
    long = paper_scores("x " * 1100 + REFERENCE, REFERENCE)
    assert long["rouge1"] == 0.0 and long["bleu1"] > 0


def test_score_answer_paper_set():
    report = score_answer(PREDICTION, answer=REFERENCE, metric_set="paper", report=True)
    assert set(report) == set(PAPER_METRICS)
    short = score_answer("Enlarged", answer="enlarged", metric_set="paper")
    assert short["accuracy"] == 1.0 and short["bleu1"] == 1.0
    closed = score_answer("B", answer="Spleen", options={"A": "Liver", "B": "Spleen"}, answer_letter="B",
                          metric_set="paper")
    assert closed == {"accuracy": 1.0}
    with pytest.raises(ValueError, match="metric_set"):
        score_answer("x", answer="y", metric_set="bleu")
