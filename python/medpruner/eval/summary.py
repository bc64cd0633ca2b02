"""The eval's summary of its records: per method the metrics with bootstrap intervals (overall and per
category), the retention of both stages, the matched-budget check, the audit against the unpruned
reference (category deltas, answer flips, fidelity) and the cost (measured and modelled, with the check
of one against the other)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from medpruner.eval import audit
from medpruner.eval.metrics import summarize

__all__ = ["REFERENCE", "SUMMARY_VERSION", "cost_check", "primary_metric", "summarize_records"]

REFERENCE = "none"
SUMMARY_VERSION = 1


def _mean(values) -> float | None:
    values = [float(v) for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _fidelity(pairs: list[tuple[dict, dict]]) -> dict:
    """audit.fidelity's answer agreement, with the first-token KL and top-1 agreement from the records
    (their logits are not stored: the KL and top-1 were computed against the reference during the run)."""
    mine = [m for m, _ in pairs]
    theirs = [r for _, r in pairs]
    result = audit.fidelity(mine, theirs)

    def fill(target: dict, group: list[dict]) -> None:
        target["n_logits"] = len(group)
        target["first_token_kl"] = _mean(r["first_token_kl"] for r in group)
        target["top1_agreement"] = _mean(float(r["top1"] == r["reference_top1"]) for r in group)

    fill(result, mine)
    for category, values in result["by_category"].items():
        fill(values, [m for m in mine if str(m["category"]) == category])
    return result


def primary_metric(records: Sequence[dict]) -> str:
    """The headline metric: accuracy when any question is closed, else BLEU-4 under the paper's
    metrics, else token F1."""
    if any(r["closed"] for r in records):
        return "accuracy"
    return "bleu4" if any("bleu4" in r["metrics"] for r in records) else "token_f1"


def summarize_records(records: Sequence[dict], methods: Sequence[str], *, bootstrap: int = 1000,
                      unavailable: dict | None = None) -> dict:
    """Per method: metrics (mean and bootstrap interval, overall and per category), retention (both
    stages), the matched-budget check, and the audit against ``none`` (category deltas, answer flips,
    fidelity) over the samples both runs have."""
    from medpruner.selectors import get_selector

    by_method: dict[str, list[dict]] = {m: [] for m in methods}
    for record in records:
        by_method.setdefault(record["method"], []).append(record)
    reference = {r["sample_id"]: r for r in by_method.get(REFERENCE, [])}
    primary = primary_metric(records)
    out = {}
    for method in methods:
        rows = by_method.get(method, [])
        spec = get_selector(method)
        metric_summary = summarize(
            [{"category": r["category"], "metrics": r["metrics"]} for r in rows], resamples=bootstrap,
            unavailable=unavailable,
        )
        budgeted = [r for r in rows if r.get("budget") is not None]
        entry = {
            "description": spec.description,
            "budgeted": spec.budgeted,
            "slice_stage": spec.slice_stage,
            "token_stage": spec.token_stage,
            "n": len(rows),
            "metrics": metric_summary,
            "primary_metric": primary,
            "retention": {
                "overall": _mean(r["retention"] for r in rows),
                "slice_stage": _mean(r["slice_stage_retention"] for r in rows),
                "token_stage": _mean(r["token_stage_retention"] for r in rows),
                "tokens_kept": _mean(r["tokens_kept"] for r in rows),
                "slices_kept": _mean(r["slices_kept"] for r in rows),
            },
            "budget_match": {
                "n": len(budgeted),
                "max_abs_gap": max((abs(r["tokens_kept"] - r["budget"]) for r in budgeted), default=None),
                "mean_relative_gap": _mean(abs(r["tokens_kept"] - r["budget"]) / r["budget"] for r in budgeted),
            },
        }
        paired = [(r, reference[r["sample_id"]]) for r in rows if r["sample_id"] in reference]
        if method != REFERENCE and paired:
            mine, theirs = [p[0] for p in paired], [p[1] for p in paired]
            entry["audit"] = {
                "category_deltas": audit.category_deltas(mine, theirs),
                "answer_flips": audit.answer_flips(mine, theirs),
                "fidelity": _fidelity(paired),
            }
        entry["cost"] = _cost_summary(rows)
        out[method] = entry
    return {"version": SUMMARY_VERSION, "methods": out, "cost_check": cost_check(by_method, methods)}


def _median(values) -> float | None:
    values = [float(v) for v in values if v is not None]
    return float(np.median(values)) if values else None


_PARTS = ("tower", "pruning", "llm_prefill")


def _cost_summary(rows: list[dict]) -> dict:
    """Per method: mean slices encoded and LLM visual tokens, the median measured seconds per part
    (and of their sum), and the mean modelled prefill of each published configuration."""
    timed = [r["seconds_split"] for r in rows if r.get("seconds_split")]
    seconds = {part: _median(t[part] for t in timed) for part in _PARTS}
    seconds["total"] = _median(sum(t[part] for part in _PARTS) for t in timed)
    modelled: dict[str, dict] = {}
    for record in rows:
        for config, cost in (record.get("modelled") or {}).items():
            modelled.setdefault(config, []).append(cost)
    return {
        "slices_encoded": _mean(r.get("slices_encoded") for r in rows),
        "visual_tokens": _mean(r.get("tokens_kept") for r in rows),
        "seconds_median": seconds,
        "modelled": {config: {key: _mean(c[key] for c in costs) for key in ("ms", "tower_tflops", "llm_tflops")}
                     for config, costs in modelled.items()},
    }


def cost_check(by_method: dict[str, list[dict]], methods: Sequence[str], tolerance: float = 0.2) -> dict:
    """The cost model against this run's measurements: per method, the median over the samples both
    have of the per-sample ratio to ``none`` of the model's own modelled FLOPs and of the measured
    seconds (tower + LLM prefill, and with the pruning); ``agrees`` when the measured ratio is within
    ``tolerance`` of the modelled one."""
    reference = {r["sample_id"]: r for r in by_method.get(REFERENCE, [])}
    out = {}
    for method in methods:
        pairs = [(r, reference[r["sample_id"]]) for r in by_method.get(method, [])
                 if r["sample_id"] in reference and r.get("modelled_flops") and r.get("seconds_split")
                 and reference[r["sample_id"]].get("seconds_split")]
        if method == REFERENCE or not pairs:
            continue

        def compute(record, pruning=False):
            split = record["seconds_split"]
            return split["tower"] + split["llm_prefill"] + (split["pruning"] if pruning else 0.0)

        # medians of per-sample ratios: one slow call (a busy neighbour, the first call's warm-up) moves
        # a ratio of sums, not a median
        modelled = _median(m["modelled_flops"] / r["modelled_flops"] for m, r in pairs)
        measured = _median(compute(m) / compute(r) for m, r in pairs)
        with_pruning = _median(compute(m, True) / compute(r, True) for m, r in pairs)
        out[method] = {"n": len(pairs), "modelled_ratio": modelled, "measured_ratio": measured,
                       "measured_ratio_with_pruning": with_pruning,
                       "agrees": abs(measured / modelled - 1) <= tolerance if modelled else None}
    return {"tolerance": tolerance, "methods": out}
