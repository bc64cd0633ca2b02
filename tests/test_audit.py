"""The pruning-impact audit against hand-computed records."""

from __future__ import annotations

import math

import pytest
import torch
from medpruner.eval.audit import answer_flips, category_deltas, fidelity, first_token_kl, pair_records


def record(sample_id, category, prediction, correct, kept=(0,), logits=None):
    return {"sample_id": sample_id, "category": category, "prediction": prediction, "correct": correct,
            "kept_slices": list(kept), "first_token_logits": logits}


REFERENCE = [
    record("1", "organ", "Liver", 1.0, logits=[2.0, 0.0, 0.0]),
    record("2", "organ", "B", 1.0, logits=[0.0, 1.0, 0.0]),
    record("3", "organ", "C", 0.0, logits=[0.0, 0.0, 3.0]),
    record("4", "plane", "axial", 1.0),
    record("5", "phase", "arterial", 0.0),
    record("6", "report", "a mass in the liver", None, logits=[1.0, 1.0, 1.0]),
]
PRUNED = [
    record("2", "organ", "b", 1.0, kept=(0, 2), logits=[0.0, 1.0, 0.0]),
    record("1", "organ", "liver.", 1.0, kept=(0, 3), logits=[1.0, 0.0, 0.0]),
    record("3", "organ", "A", 1.0, kept=(1,), logits=[3.0, 0.0, 0.0]),
    record("4", "plane", "coronal", 0.0, kept=(0, 1, 5)),
    record("5", "phase", "venous", 0.0, kept=(4,)),
    record("6", "report", "normal", None, kept=(2,), logits=[1.0, 1.0, 1.0]),
]


def test_category_deltas_hand_computed():
    rows = category_deltas(PRUNED, REFERENCE)
    # 5 labelled samples: organ 3 (2/3 -> 3/3), plane 1 (1 -> 0), phase 1 (0 -> 0); rarest first, by name
    assert [r["category"] for r in rows] == ["phase", "plane", "organ"]
    organ = rows[2]
    assert organ["n"] == 3 and organ["frequency"] == pytest.approx(3 / 5)
    assert organ["reference_accuracy"] == pytest.approx(2 / 3) and organ["pruned_accuracy"] == 1.0
    assert organ["delta"] == pytest.approx(1 / 3)
    assert rows[1]["delta"] == -1.0 and rows[0]["delta"] == 0.0 and rows[0]["frequency"] == pytest.approx(0.2)


def test_answer_flips_with_kept_slices():
    flips = answer_flips(PRUNED, REFERENCE)
    assert [(f["sample_id"], f["kind"]) for f in flips] == [
        ("3", "wrong->correct"), ("4", "correct->wrong"), ("5", "changed"), ("6", "changed"),
    ]
    assert flips[1]["kept_slices"] == [0, 1, 5] and flips[1]["reference_prediction"] == "axial"
    assert flips[1]["pruned_prediction"] == "coronal" and flips[1]["category"] == "plane"


def ref_kl(p_logits, q_logits):
    p = [math.exp(v) / sum(math.exp(w) for w in p_logits) for v in p_logits]
    q = [math.exp(v) / sum(math.exp(w) for w in q_logits) for v in q_logits]
    return sum(a * math.log(a / b) for a, b in zip(p, q))


def test_first_token_kl_against_a_loop_and_its_properties():
    assert first_token_kl([2.0, 0.0, 0.0], [1.0, 0.0, 0.0]) == pytest.approx(ref_kl([2, 0, 0], [1, 0, 0]))
    logits = torch.randn(2, 50, dtype=torch.float64)
    assert first_token_kl(logits[0], logits[1]) == pytest.approx(ref_kl(logits[0].tolist(), logits[1].tolist()))
    assert first_token_kl(logits[0], logits[0] + 7.0) == pytest.approx(0.0, abs=1e-12)  # shift-invariant
    assert first_token_kl(torch.tensor([1.0, 2.0], dtype=torch.bfloat16), [1.0, 2.0]) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="first_token_logits"):
        first_token_kl([1.0, 2.0], [1.0, 2.0, 3.0])


def test_fidelity_hand_computed():
    result = fidelity(PRUNED, REFERENCE)
    # equal normalised answers: 1 ("liver."), 2 ("b") -> 2 of 6
    assert result["n"] == 6 and result["answer_agreement"] == pytest.approx(2 / 6)
    # logits on both sides: 1, 2, 3, 6; top-1 equal for 1, 2, 6 (3: index 2 -> 0)
    assert result["n_logits"] == 4 and result["top1_agreement"] == pytest.approx(3 / 4)
    expected_kl = (ref_kl([2, 0, 0], [1, 0, 0]) + 0 + ref_kl([0, 0, 3], [3, 0, 0]) + 0) / 4
    assert result["first_token_kl"] == pytest.approx(expected_kl)
    plane = result["by_category"]["plane"]
    assert plane == {"n": 1, "answer_agreement": 0.0, "n_logits": 0, "first_token_kl": None, "top1_agreement": None}
    assert result["by_category"]["organ"]["answer_agreement"] == pytest.approx(2 / 3)


def test_pairing_checks():
    assert [p[1]["sample_id"] for p in pair_records(PRUNED, REFERENCE)] == ["1", "2", "3", "4", "5", "6"]
    with pytest.raises(ValueError, match="different samples.*'6'"):
        category_deltas(PRUNED[:-1], REFERENCE)
    with pytest.raises(ValueError, match="reference: sample_id '1' appears twice"):
        fidelity(PRUNED, REFERENCE + REFERENCE[:1])
