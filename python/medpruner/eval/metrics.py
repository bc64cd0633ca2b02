"""Answer metrics that need no download, per category, with seeded bootstrap confidence intervals.

Normalisation (:func:`normalize_answer`): Unicode NFKC, lower case, every punctuation or symbol
character becomes a space, runs of whitespace become one space, ends stripped. Articles are kept (a
medical answer like "a mass" vs "mass" is left to token F1).

Closed-ended matching (:func:`extract_choice`), in this order; only letters that are options count:

1. a letter: the whole answer is the letter, bare or bracketed, with trailing punctuation ("B", "(b)",
   "B."); or it starts with the letter followed by ".", ")" or ":" ("B. Liver", "(B) liver", "b: liver");
   or it contains "answer is X", "answer: X" or "option X" (X a letter standing alone);
2. the option text: the normalised answer equals one option's normalised text; else the options whose
   normalised text occurs in the normalised answer as whole words, ignoring any that is part of another
   one found ("left kidney" wins over "kidney"), when exactly one remains;
3. otherwise no option is chosen, and the answer counts as wrong.

The gold option is the sample's answer letter, or, without one, the option its answer text matches by
rule 2. A question that comes with its gold letter but no option texts is matched by letter (A-D).
Accuracy is 1 when the chosen option is the gold one.

Open-ended: ``accuracy`` is the exact match, so that a dataset mixing closed and short open answers
(yes/no, a count) has one accuracy over every question; exact match (normalised strings equal), token
F1 (bag of normalised tokens), BLEU (sacrebleu's sentence BLEU-4 with its default exponential
smoothing and 13a tokeniser, / 100) and ROUGE-L F-measure (rouge-score, no stemming). METEOR (nltk
with its WordNet data) and BERTScore (the ``bert_score`` package and a local model) are computed only
when available and are reported as unavailable, with the reason, otherwise, never as 0.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

__all__ = [
    "CLOSED_METRICS",
    "METRIC_SETS",
    "OPEN_METRICS",
    "bleu",
    "bootstrap_ci",
    "closed_accuracy",
    "exact_match",
    "extract_choice",
    "meteor",
    "normalize_answer",
    "optional_metrics",
    "rouge_l",
    "score_answer",
    "summarize",
    "token_f1",
]

CLOSED_METRICS = ("accuracy",)
OPEN_METRICS = ("accuracy", "exact_match", "token_f1", "bleu", "rouge_l")


# ----------------------------------------------------------------------------------- normalisation
def normalize_answer(text: str) -> str:
    text = unicodedata.normalize("NFKC", str(text)).lower()
    text = "".join(" " if unicodedata.category(ch)[0] in "PS" else ch for ch in text)
    return " ".join(text.split())


def _tokens(text: str) -> list[str]:
    return normalize_answer(text).split()


def _contains_words(haystack: str, needle: str) -> bool:
    return bool(needle) and f" {needle} " in f" {haystack} "


# -------------------------------------------------------------------------------------- closed-ended
def _letter(prediction: str, letters: set[str]) -> str | None:
    text = unicodedata.normalize("NFKC", str(prediction)).strip()
    alone = re.fullmatch(r"[\(\[]?\s*([A-Za-z])\s*[\)\]]?[\s.:,;!]*", text)
    if alone and alone.group(1).upper() in letters:
        return alone.group(1).upper()
    marker = re.match(r"[\(\[]?\s*([A-Za-z])\s*(?:[.):\]]|\)\s)", text)
    if marker and marker.group(1).upper() in letters:
        return marker.group(1).upper()
    for found in re.finditer(r"\b(?:answer\s+is|answer\s*:|option)\s*[\(\[]?([A-Za-z])\b", text, re.IGNORECASE):
        if found.group(1).upper() in letters:
            return found.group(1).upper()
    return None


def _by_text(text: str, options: Mapping[str, str]) -> str | None:
    answer = normalize_answer(text)
    normalised = {letter: normalize_answer(option) for letter, option in options.items()}
    equal = [letter for letter, option in normalised.items() if option and option == answer]
    if len(equal) == 1:
        return equal[0]
    found = [letter for letter, option in normalised.items() if _contains_words(answer, option)]
    widest = [
        letter
        for letter in found
        if not any(other != letter and normalised[other] != normalised[letter]
                   and _contains_words(normalised[other], normalised[letter]) for other in found)
    ]
    return widest[0] if len(widest) == 1 else None


def extract_choice(prediction: str, options: Mapping[str, str] | Iterable[str]) -> str | None:
    """The option letter an answer chooses (the rules in the module docstring), or None.

    ``options``: letter -> option text, or just the letters (then only rule 1 applies)."""
    texts = dict(options) if isinstance(options, Mapping) else {str(letter): "" for letter in options}
    texts = {str(letter).upper(): text for letter, text in texts.items()}
    return _letter(prediction, set(texts)) or _by_text(prediction, {k: v for k, v in texts.items() if v})


def closed_accuracy(prediction: str, options: Mapping[str, str], answer_letter: str | None,
                    answer: str | None = None) -> float:
    """1.0 when ``prediction`` chooses the gold option, else 0.0 (no choice counts as wrong)."""
    gold = answer_letter.strip().upper() if answer_letter else None
    if gold is None and answer is not None:
        gold = _by_text(answer, {k.upper(): v for k, v in options.items() if v})
    if gold is None:
        raise ValueError("closed_accuracy: the gold option is unknown (no answer_letter and no option matches answer)")
    # Data that gives only the gold letter (no option texts) is matched by letter among A-D.
    choices = options if options else sorted({"A", "B", "C", "D", gold})
    return float(extract_choice(prediction, choices) == gold)


# ---------------------------------------------------------------------------------------- open-ended
def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    """F1 of the bags of normalised tokens (1.0 when both are empty)."""
    predicted, expected = _tokens(prediction), _tokens(reference)
    if not predicted or not expected:
        return float(predicted == expected)
    common = sum((Counter(predicted) & Counter(expected)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def bleu(prediction: str, reference: str) -> float:
    import sacrebleu

    return sacrebleu.sentence_bleu(prediction, [reference]).score / 100.0


_ROUGE = None


def rouge_l(prediction: str, reference: str) -> float:
    global _ROUGE
    if _ROUGE is None:
        from rouge_score import rouge_scorer

        _ROUGE = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return _ROUGE.score(reference, prediction)["rougeL"].fmeasure


def meteor(prediction: str, reference: str) -> float:
    from nltk.translate.meteor_score import meteor_score

    return float(meteor_score([_tokens(reference)], _tokens(prediction)))


def optional_metrics(bertscore_model: str | None = None) -> dict[str, str | None]:
    """Metric name -> None when it can be computed here, else the reason it cannot."""
    status: dict[str, str | None] = {}
    try:
        from nltk.corpus import wordnet

        wordnet.ensure_loaded()
        status["meteor"] = None
    except ImportError:
        status["meteor"] = "unavailable: nltk is not installed"
    except LookupError:
        status["meteor"] = "unavailable: nltk's WordNet data is not installed (nltk.download('wordnet'))"
    try:
        import bert_score  # noqa: F401

        status["bertscore"] = None if bertscore_model else "unavailable: no local BERTScore model given"
    except ImportError:
        status["bertscore"] = "unavailable: bert_score is not installed"
    return status


def bertscore_f1(predictions: Sequence[str], references: Sequence[str], model: str, num_layers: int) -> list[float]:
    """BERTScore F1 per pair from a local model (``bert_score`` installed; see :func:`optional_metrics`)."""
    import bert_score

    _, _, f1 = bert_score.score(list(predictions), list(references), model_type=model, num_layers=num_layers)
    return [float(v) for v in f1]


METRIC_SETS = ("default", "paper")


def score_answer(prediction: str, *, answer: str, options: Mapping[str, str] | None = None,
                 answer_letter: str | None = None, meteor_available: bool = False, metric_set: str = "default",
                 report: bool = False) -> dict[str, float]:
    """Per-sample metrics: ``accuracy`` for a closed question (options or a gold letter given), the open
    metrics otherwise, ``accuracy`` among them as the exact match (plus ``meteor`` when available).

    ``metric_set="paper"``: an open answer gets the published evaluation's report metrics instead
    (:mod:`medpruner.eval.paper_metrics`: BLEU-1..4, ROUGE-1/2/L, METEOR when available), with the exact
    match as ``accuracy`` unless ``report`` (a generated report has no exact answer)."""
    if metric_set not in METRIC_SETS:
        raise ValueError(f"metric_set must be one of {METRIC_SETS}, got {metric_set!r}")
    if options or answer_letter:
        return {"accuracy": closed_accuracy(prediction, options or {}, answer_letter, answer)}
    if metric_set == "paper":
        from medpruner.eval.paper_metrics import paper_scores

        scores = paper_scores(prediction, answer, meteor_available=meteor_available)
        return scores if report else {"accuracy": exact_match(prediction, answer), **scores}
    matched = exact_match(prediction, answer)
    scores = {
        "accuracy": matched,
        "exact_match": matched,
        "token_f1": token_f1(prediction, answer),
        "bleu": bleu(prediction, answer),
        "rouge_l": rouge_l(prediction, answer),
    }
    if meteor_available:
        scores["meteor"] = meteor(prediction, answer)
    return scores


# ------------------------------------------------------------------------------------- aggregation
def bootstrap_ci(values: Sequence[float], *, resamples: int = 1000, confidence: float = 0.95,
                 seed: int = 0) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the mean: ``resamples`` draws of n values with replacement
    (``numpy.random.default_rng(seed).integers(0, n, (resamples, n))``), the ``(1 - confidence) / 2``
    and ``(1 + confidence) / 2`` quantiles (linear interpolation) of their means. None for no values."""
    if not isinstance(resamples, int) or resamples < 1:
        raise ValueError(f"bootstrap_ci: resamples must be a positive int, got {resamples!r}")
    if not 0 < confidence < 1:
        raise ValueError(f"bootstrap_ci: confidence must be in (0, 1), got {confidence!r}")
    data = np.asarray(values, dtype=np.float64)
    if data.size == 0:
        return None
    draws = np.random.default_rng(seed).integers(0, data.size, size=(resamples, data.size))
    means = data[draws].mean(axis=1)
    low, high = np.quantile(means, [(1 - confidence) / 2, (1 + confidence) / 2])
    return float(low), float(high)


def _aggregate(values: list[float], resamples: int, confidence: float, seed: int) -> dict:
    interval = bootstrap_ci(values, resamples=resamples, confidence=confidence, seed=seed)
    return {
        "mean": float(np.mean(values)) if values else math.nan,
        "ci_low": None if interval is None else interval[0],
        "ci_high": None if interval is None else interval[1],
        "n": len(values),
    }


def summarize(rows: Iterable[Mapping], *, resamples: int = 1000, confidence: float = 0.95, seed: int = 0,
              unavailable: Mapping[str, str | None] | None = None) -> dict:
    """Aggregate per-sample metrics.

    ``rows``: mappings with ``category`` (str) and ``metrics`` (name -> value, as :func:`score_answer`
    gives). Returns ``{"overall": {metric: stats}, "by_category": {category: {metric: stats}},
    "unavailable": {metric: reason}}`` with ``stats = {mean, ci_low, ci_high, n}``; every category's
    interval uses the same ``seed`` (reproducible, independent of the other categories)."""
    overall: dict[str, list[float]] = {}
    by_category: dict[str, dict[str, list[float]]] = {}
    for row in rows:
        category = str(row["category"])
        for name, value in row["metrics"].items():
            overall.setdefault(name, []).append(float(value))
            by_category.setdefault(category, {}).setdefault(name, []).append(float(value))
    return {
        "overall": {name: _aggregate(v, resamples, confidence, seed) for name, v in sorted(overall.items())},
        "by_category": {
            category: {name: _aggregate(v, resamples, confidence, seed) for name, v in sorted(metrics.items())}
            for category, metrics in sorted(by_category.items())
        },
        "unavailable": {name: reason for name, reason in (unavailable or {}).items() if reason},
    }
