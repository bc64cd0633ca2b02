"""The report metrics of the published MedPruner evaluation (``--metrics paper``), so that numbers sit
beside the paper's table. Rules read from Saint-lsy/MedPruner ``MedUniEval/utils/Metrics_Compute/
cal_report_metrics.py`` and the libraries it calls (nltk's ``sentence_bleu``, the ``rouge`` package of
pltrdy), implemented here from those rules:

* the prediction loses every ``Findings:`` and ``Impression:`` (case as written, anywhere); an empty
  prediction scores 0 on every metric and still counts in the mean (the script divides by all samples);
* tokens (BLEU, METEOR): lower case, every "." becomes its own token, split on single spaces, empty
  tokens dropped (newlines and commas stay inside tokens);
* BLEU-n: nltk's sentence BLEU of one reference with uniform weights over 1..n-grams and no smoothing:
  clipped n-gram precisions (denominator at least 1), a zero unigram match gives 0, another zero
  precision is replaced by the smallest positive float (so the score is ~0, not an error), times the
  brevity penalty exp(1 - r/c) when the prediction is shorter than the reference;
* ROUGE-1/2/L F (pltrdy ``rouge``): on the lower-cased strings, the prediction cut to 2048 characters;
  sentences are the non-empty pieces between "." with runs of whitespace made one space, words are
  split on spaces; ROUGE-N counts *distinct* n-grams (across sentence ends), ROUGE-L is the
  summary-level union LCS over distinct words; F = 2PR / (P + R + 1e-8);
* METEOR: nltk's ``single_meteor_score`` on the tokens, only when nltk's WordNet data is installed
  (otherwise reported as unavailable, never as 0, unlike the script, which then downloads it).

Scores are fractions in [0, 1] (the paper's table multiplies by 100).
"""

from __future__ import annotations

import math
import sys
from collections import Counter

__all__ = ["PAPER_METRICS", "paper_bleu", "paper_rouge_l", "paper_rouge_n", "paper_scores", "paper_tokens"]

PAPER_METRICS = ("bleu1", "bleu2", "bleu3", "bleu4", "rouge1", "rouge2", "rougeL")
_STRIPPED = ("Findings:", "Impression:")
_ROUGE_CHARS = 2048


def paper_tokens(text: str) -> list[str]:
    """The script's tokens: lower case, "." a token of its own, split on single spaces, no empty ones."""
    return [t for t in text.lower().replace(".", " .").split(" ") if t]


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def paper_bleu(prediction: list[str], reference: list[str], order: int) -> float:
    """nltk's ``sentence_bleu([reference], prediction, weights=[1 / order] * order)`` without smoothing."""
    if order < 1:
        raise ValueError(f"order must be >= 1, got {order}")
    precisions = []
    for n in range(1, order + 1):
        predicted = _ngrams(prediction, n)
        matched = sum(min(count, _ngrams(reference, n)[gram]) for gram, count in predicted.items())
        precisions.append((matched, max(1, sum(predicted.values()))))
    if precisions[0][0] == 0:
        return 0.0
    c, r = len(prediction), len(reference)
    brevity = 1.0 if c > r else math.exp(1 - r / c)
    log_sum = sum(math.log(m / d if m else sys.float_info.min) for m, d in precisions) / order
    return brevity * math.exp(log_sum)


def _sentences(text: str) -> list[list[str]]:
    return [" ".join(piece.split()).split(" ") for piece in text.split(".") if piece]


def _f(overlap: int, predicted: int, expected: int) -> float:
    precision = overlap / predicted if predicted else 0.0
    recall = overlap / expected if expected else 0.0
    return 2.0 * precision * recall / (precision + recall + 1e-8)


def paper_rouge_n(prediction: str, reference: str, n: int) -> float:
    """pltrdy ROUGE-N F over distinct n-grams of the words of all sentences; 0 when a side has none."""
    predicted, expected = _sentences(prediction), _sentences(reference)
    if not predicted or not expected:
        return 0.0
    words_p = [w for s in predicted for w in s]
    words_r = [w for s in expected for w in s]
    grams_p, grams_r = set(_ngrams(words_p, n)), set(_ngrams(words_r, n))
    return _f(len(grams_p & grams_r), len(grams_p), len(grams_r))


def _lcs_words(reference: list[str], prediction: list[str]) -> set[str]:
    """The words of one longest common subsequence, traced back from the end: on a match take it, else
    step in the reference when that keeps a strictly longer LCS, otherwise in the prediction (pltrdy's
    tie rule, which decides which words the union counts)."""
    rows, cols = len(reference), len(prediction)
    table = [[0] * (cols + 1) for _ in range(rows + 1)]
    for i in range(1, rows + 1):
        for j in range(1, cols + 1):
            table[i][j] = (table[i - 1][j - 1] + 1 if reference[i - 1] == prediction[j - 1]
                           else max(table[i - 1][j], table[i][j - 1]))
    words, i, j = set(), rows, cols
    while i > 0 and j > 0:
        if reference[i - 1] == prediction[j - 1]:
            words.add(reference[i - 1])
            i, j = i - 1, j - 1
        elif table[i - 1][j] > table[i][j - 1]:
            i -= 1
        else:
            j -= 1
    return words


def paper_rouge_l(prediction: str, reference: str) -> float:
    """pltrdy summary-level ROUGE-L F: the distinct words of the union of the LCSs of every reference
    sentence with every predicted sentence, over the distinct words of each side."""
    predicted, expected = _sentences(prediction), _sentences(reference)
    if not predicted or not expected:
        return 0.0
    union: set[str] = set()
    for ref_sentence in expected:
        for sentence in predicted:
            union |= _lcs_words(ref_sentence, sentence)
    distinct_p = {w for s in predicted for w in s}
    distinct_r = {w for s in expected for w in s}
    return _f(len(union), len(distinct_p), len(distinct_r))


def paper_scores(prediction: str, reference: str, *, meteor_available: bool = False) -> dict[str, float]:
    """Every paper metric of one sample (plus ``meteor`` when available)."""
    response = prediction
    for label in _STRIPPED:
        response = response.replace(label, "")
    names = PAPER_METRICS + (("meteor",) if meteor_available else ())
    if response == "":
        return dict.fromkeys(names, 0.0)
    predicted, expected = paper_tokens(response), paper_tokens(reference)
    scores = {f"bleu{n}": paper_bleu(predicted, expected, n) for n in range(1, 5)}
    cut, golden = response.lower()[:_ROUGE_CHARS], reference.lower()
    scores.update(rouge1=paper_rouge_n(cut, golden, 1), rouge2=paper_rouge_n(cut, golden, 2),
                  rougeL=paper_rouge_l(cut, golden))
    if meteor_available:
        from nltk.translate.meteor_score import single_meteor_score

        scores["meteor"] = float(single_meteor_score(expected, predicted))
    return scores
