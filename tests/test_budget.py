"""The fixed token budget (DESIGN.md "Fixed token budget"): the split rule against a direct reading of
the formula, the config field, and on every family and both modes the exact documented counts per slice
and per volume, the highest-mass tokens chosen, and a working generate."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("transformers")
pytest.importorskip("PIL")

from _tiny_models import (  # noqa: E402
    gemma_processor,
    gemma_volume_inputs,
    paper_scale_pixels,
    qwen_processor,
    qwen_volume_inputs,
    synthetic_volume,
    tiny_gemma3,
    tiny_qwen2_5_vl,
    tiny_qwen3_vl,
)
from medpruner import MedPrunerConfig, apply_medpruner, remove_medpruner  # noqa: E402
from medpruner.adapters.base import Adapter  # noqa: E402
from medpruner.config import budget_split, context_targets  # noqa: E402

from medpruner_kernels import reference  # noqa: E402

BACKEND = "torch"
FAMILIES = {
    "qwen3_vl": (tiny_qwen3_vl, functools.partial(qwen_processor, "qwen3_vl"), qwen_volume_inputs, "image_grid_thw"),
    "qwen2_5_vl": (
        tiny_qwen2_5_vl,
        functools.partial(qwen_processor, "qwen2_5_vl", clip_norm=True),
        qwen_volume_inputs,
        "image_grid_thw",
    ),
    "gemma3": (tiny_gemma3, gemma_processor, gemma_volume_inputs, None),
}


def _expected_split(budget, k, n):
    """The DESIGN.md rule read literally, one slice at a time."""
    if isinstance(budget, float):
        total = math.ceil(budget * (k * n))
    else:
        total = budget
    total = max(k, min(total, k * n))
    return [total // k + (1 if i < total % k else 0) for i in range(k)]


@pytest.mark.parametrize("k", [1, 2, 3, 7])
@pytest.mark.parametrize("n", [1, 4, 16])
@pytest.mark.parametrize("budget", [0.01, 0.1, 0.25, 0.5, 1.0, 1, 5, 17, 10_000])
def test_budget_split_follows_the_rule(budget, k, n):
    split = budget_split(budget, k, n)
    assert split == _expected_split(budget, k, n)
    assert len(split) == k and min(split) >= 1 and max(split) <= n
    assert max(split) - min(split) <= 1 and split == sorted(split, reverse=True)


_VOLUME = st.tuples(
    st.sampled_from([1, 2, 3, 4, 9, 16, 25, 64, 100]),  # tokens per slice (one grid per volume)
    st.lists(st.booleans(), min_size=1, max_size=9),  # the IAF mask of its slices
)
_BUDGET = st.one_of(
    st.sampled_from([0.01, 0.05, 0.1, 1 / 3, 0.3, 0.5, 0.7, 0.999, 1.0]),
    st.floats(min_value=1e-4, max_value=1.0, exclude_min=True),
    st.integers(min_value=1, max_value=2_000),
)


@settings(max_examples=400, deadline=None)
@given(
    volumes=st.lists(_VOLUME, min_size=1, max_size=4),
    budget=_BUDGET,
    merge=st.booleans(),
    context_frac=st.sampled_from([0.0, 0.01, 0.05, 0.1, 0.3, 0.5, 1.0]),
)
def test_device_budget_counts_equal_the_host_rule(volumes, budget, merge, context_frac):
    """The device path the pipeline and the vLLM processor take (``Adapter._budget_counts``, a batch of
    volumes at once) against the host rule (``budget_split`` + ``context_targets``, one volume at a
    time): per slice, the tokens kept, the DINS picks and the merge targets; a dropped slice keeps all
    its tokens and no target (it takes no part in the budget)."""
    keep = [kept for _, mask in volumes for kept in mask]
    tokens = [n for n, mask in volumes for _ in mask]
    rows = [v for v, (_, mask) in enumerate(volumes) for _ in mask]
    volume_cu = torch.tensor([0, *torch.tensor([len(m) for _, m in volumes]).cumsum(0).tolist()], dtype=torch.int32)
    config = MedPrunerConfig(budget=budget, merge=merge, context_frac=context_frac)
    share, picks, targets = Adapter._budget_counts(
        torch.tensor(keep), volume_cu, torch.tensor(rows), torch.tensor(tokens), config
    )
    expected_share, expected_targets = [], []
    for n, mask in volumes:
        split = iter(budget_split(budget, sum(mask), n))
        for kept in mask:
            b = next(split) if kept else n
            expected_share.append(b)
            expected_targets.append(context_targets(b, n, context_frac) if kept and merge else 0)
    assert share.tolist() == expected_share
    assert targets.tolist() == expected_targets
    assert picks.tolist() == [b - c for b, c in zip(expected_share, expected_targets, strict=True)]


def test_device_budget_counts_without_a_budget_are_none():
    keep = torch.tensor([True, False])
    assert Adapter._budget_counts(
        keep, torch.tensor([0, 2], dtype=torch.int32), torch.zeros(2, dtype=torch.long), torch.tensor([4, 4]),
        MedPrunerConfig(),
    ) is None


@pytest.mark.parametrize(
    "kept, n, frac, expected", [(1, 16, 0.05, 0), (2, 16, 0.05, 1), (9, 100, 0.05, 5), (3, 100, 0.5, 2)]
)
def test_context_targets(kept, n, frac, expected):
    assert context_targets(kept, n, frac) == expected


@pytest.mark.parametrize(
    "budget, error",
    [(0, ValueError), (-3, ValueError), (0.0, ValueError), (1.5, ValueError), (True, TypeError), ("8", TypeError)],
)
def test_config_rejects_bad_budgets_naming_the_field(budget, error):
    with pytest.raises(error, match="budget"):
        MedPrunerConfig(budget=budget)


@pytest.mark.parametrize("budget", [None, 0.25, 12])
def test_config_budget_round_trips_through_json(budget):
    config = MedPrunerConfig(budget=budget)
    again = MedPrunerConfig.from_json(config.to_json())
    assert again == config and type(again.budget) is type(budget)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    build, processor, volume_inputs, _ = FAMILIES[request.param]
    model = build()
    inputs = volume_inputs(processor(), [synthetic_volume(6, seed=1), synthetic_volume(3, seed=2)])
    yield request.param, model, inputs
    remove_medpruner(model)


def _iaf_mask(model, inputs, gamma):
    """Per volume, the reference IAF mask of its slices (float64, paper pixel scale)."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
    image_id = model.config.image_token_id
    is_image = (ids == image_id) & mask
    starts = is_image & ~torch.nn.functional.pad(is_image[:, :-1], (1, 0))
    per_row = starts.sum(1).tolist()
    num_images = sum(per_row)
    pixels = paper_scale_pixels(model, inputs["pixel_values"], num_images)
    cu = torch.tensor([0] + torch.tensor(per_row).cumsum(0).tolist())
    keep, _ = reference.iaf_select(pixels, gamma, cu)
    return [keep[a:b].tolist() for a, b in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True)]


@pytest.mark.parametrize("mode", ["fast", "paper"])
@pytest.mark.parametrize("budget, merge", [(0.3, True), (0.3, False), (5, True), (1.0, False), (10_000, True)])
def test_budget_gives_the_documented_counts(family, mode, budget, merge):
    name, model, inputs = family
    gamma = 0.05
    apply_medpruner(model, gamma=gamma, budget=budget, merge=merge, mode=mode, backend=BACKEND, record_tokens=True)
    with torch.no_grad():
        logits = model(**inputs).logits
    stats = model.medpruner_stats
    n = stats.tokens_before // sum(stats.slices_total)
    assert stats.budget == budget
    for keep, per_slice in zip(_iaf_mask(model, inputs, gamma), stats.tokens_per_slice, strict=True):
        split = iter(budget_split(budget, sum(keep), n))
        dropped = 1 if mode == "paper" else 0
        assert per_slice == [next(split) if kept else dropped for kept in keep]
    assert stats.tokens_per_volume == [sum(s) for s in stats.tokens_per_slice]
    assert stats.tokens_after == sum(stats.tokens_per_volume)
    assert int(stats.token_keep.sum()) == stats.tokens_after
    # Without merge the kept tokens of a slice are its highest-mass ones (ties: lower index).
    if not merge:
        scores = stats.token_scores.view(-1, n)
        keep = stats.token_keep.view(-1, n)
        for slice_scores, slice_keep in zip(scores, keep, strict=True):
            count = int(slice_keep.sum())
            if count > 1 or mode == "fast":
                order = sorted(range(n), key=lambda i: (-float(slice_scores[i]), i))
                assert set(slice_keep.nonzero().flatten().tolist()) == set(order[:count])
    assert logits.shape[1] < inputs["input_ids"].shape[1]


@pytest.mark.parametrize("mode", ["fast", "paper"])
def test_budget_generate_first_token_matches_forward(family, mode):
    _, model, inputs = family
    apply_medpruner(model, budget=6, mode=mode, backend=BACKEND)
    with torch.no_grad():
        logits = model(**inputs).logits
        generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    prompt = inputs["input_ids"].shape[1]
    assert generated.shape == (2, prompt + 3)
    assert torch.equal(generated[:, prompt], logits[:, -1].argmax(-1))
