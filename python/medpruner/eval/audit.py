"""The pruning-impact audit: pure functions on per-sample result records of a pruned and an unpruned run.

A record is a mapping with ``sample_id``, ``category``, ``prediction`` (the answer text), ``correct``
(1.0/0.0 for a closed question, None when there is no label or the question is open), ``kept_slices``
(slice indices the pruned run kept) and, optionally, ``first_token_logits`` (the logits over the
vocabulary of the first generated token). Records of the two runs are paired by ``sample_id``.

Rare categories are hurt first under pruning (the long-tailed multi-label pruning study the design
cites), so the audit reports per-category accuracy deltas with the category's frequency, the samples
whose answer flips, and the fidelity to the unpruned model, which needs no labels: answer agreement,
the first token's KL divergence KL(unpruned || pruned) and top-1 agreement.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch

from medpruner.eval.metrics import normalize_answer

__all__ = ["answer_flips", "category_deltas", "fidelity", "first_token_kl", "pair_records"]


def pair_records(pruned: Iterable[Mapping], reference: Iterable[Mapping]) -> list[tuple[Mapping, Mapping]]:
    """(pruned, reference) pairs in the reference's order; ValueError for a duplicate id or an id that
    only one run has (named, up to five)."""
    indexed = []
    for name, records in (("pruned", pruned), ("reference", reference)):
        by_id: dict[str, Mapping] = {}
        for record in records:
            key = str(record["sample_id"])
            if key in by_id:
                raise ValueError(f"{name}: sample_id {key!r} appears twice")
            by_id[key] = record
        indexed.append(by_id)
    mine, theirs = indexed
    only_one = sorted(set(mine) ^ set(theirs))
    if only_one:
        raise ValueError(f"pruned and reference runs cover different samples, e.g. {only_one[:5]}")
    return [(mine[key], record) for key, record in theirs.items()]


def category_deltas(pruned: Sequence[Mapping], reference: Sequence[Mapping]) -> list[dict]:
    """Per category with labelled samples: ``n``, ``frequency`` (its share of the labelled samples),
    ``reference_accuracy``, ``pruned_accuracy`` and ``delta`` (pruned - reference); rarest first (ties:
    by name)."""
    totals: dict[str, list[float]] = {}
    for mine, theirs in pair_records(pruned, reference):
        if mine.get("correct") is None or theirs.get("correct") is None:
            continue
        counts = totals.setdefault(str(theirs["category"]), [0, 0.0, 0.0])
        counts[0] += 1
        counts[1] += float(theirs["correct"])
        counts[2] += float(mine["correct"])
    labelled = sum(c[0] for c in totals.values())
    rows = []
    for category, (n, ref_right, pruned_right) in totals.items():
        rows.append({
            "category": category,
            "n": n,
            "frequency": n / labelled,
            "reference_accuracy": ref_right / n,
            "pruned_accuracy": pruned_right / n,
            "delta": (pruned_right - ref_right) / n,
        })
    return sorted(rows, key=lambda row: (row["n"], row["category"]))


def answer_flips(pruned: Sequence[Mapping], reference: Sequence[Mapping]) -> list[dict]:
    """The samples whose normalised answer changes under pruning, with the pruned run's kept slices.
    ``kind``: "correct->wrong", "wrong->correct", or "changed" (same correctness, or no label)."""
    flips = []
    for mine, theirs in pair_records(pruned, reference):
        if normalize_answer(mine["prediction"]) == normalize_answer(theirs["prediction"]):
            continue
        before, after = theirs.get("correct"), mine.get("correct")
        kind = "changed"
        if before is not None and after is not None and float(before) != float(after):
            kind = "correct->wrong" if float(before) > float(after) else "wrong->correct"
        flips.append({
            "sample_id": str(theirs["sample_id"]),
            "category": str(theirs["category"]),
            "kind": kind,
            "reference_prediction": theirs["prediction"],
            "pruned_prediction": mine["prediction"],
            "kept_slices": list(mine.get("kept_slices") or []),
        })
    return flips


def first_token_kl(reference_logits, pruned_logits) -> float:
    """KL(softmax(reference) || softmax(pruned)) in nats, computed in float64."""
    ref = torch.as_tensor(reference_logits, dtype=torch.float64).flatten()
    mine = torch.as_tensor(pruned_logits, dtype=torch.float64).flatten()
    if ref.shape != mine.shape or ref.numel() == 0:
        raise ValueError(f"first_token_logits: shapes differ or are empty ({tuple(ref.shape)} vs {tuple(mine.shape)})")
    log_p, log_q = torch.log_softmax(ref, 0), torch.log_softmax(mine, 0)
    return float((log_p.exp() * (log_p - log_q)).sum())


def _top1(record: Mapping) -> int:
    # argmax returns the first maximal index, so a tie resolves the same way in both runs.
    return int(torch.as_tensor(record["first_token_logits"]).argmax())


def _fidelity(pairs) -> dict:
    agree = [normalize_answer(m["prediction"]) == normalize_answer(r["prediction"]) for m, r in pairs]
    with_logits = [(m, r) for m, r in pairs
                   if m.get("first_token_logits") is not None and r.get("first_token_logits") is not None]
    kls = [first_token_kl(r["first_token_logits"], m["first_token_logits"]) for m, r in with_logits]
    top1 = [_top1(m) == _top1(r) for m, r in with_logits]
    return {
        "n": len(pairs),
        "answer_agreement": sum(agree) / len(agree) if agree else None,
        "n_logits": len(with_logits),
        "first_token_kl": sum(kls) / len(kls) if kls else None,
        "top1_agreement": sum(top1) / len(top1) if top1 else None,
    }


def fidelity(pruned: Sequence[Mapping], reference: Sequence[Mapping]) -> dict:
    """Label-free fidelity to the reference run, overall and per category: ``answer_agreement`` (share of
    equal normalised answers), and over the pairs where both have first-token logits, the mean
    ``first_token_kl`` and ``top1_agreement`` (None where no pair has them)."""
    pairs = pair_records(pruned, reference)
    by_category: dict[str, list] = {}
    for pair in pairs:
        by_category.setdefault(str(pair[1]["category"]), []).append(pair)
    return {
        **_fidelity(pairs),
        "by_category": {category: _fidelity(group) for category, group in sorted(by_category.items())},
    }
