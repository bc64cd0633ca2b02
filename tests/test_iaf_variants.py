"""The slice-stage variants beyond the paper (issue 27): local-change IAF (``iaf="local"``) and the budget
split that follows each slice's change (``allocation="change"``): the host rule against its definition,
and on every family the kept slices and per-slice counts against the float64 references, computed here
independently of the pipeline."""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import given
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
from medpruner.config import budget_split, change_split, proportional_split  # noqa: E402

from medpruner_kernels import reference  # noqa: E402

BACKEND = "torch"


# ------------------------------------------------------------------------------ the host split rule
def test_change_split_by_hand():
    # The first slice weighs as the largest change (0.3): 15 tokens above the minimum at level 20 give
    # 6, 2, 6, 1, 0 exactly.
    assert change_split(0.25, [0.0, 0.1, 0.3, 0.05, 0.0], 16) == [7, 3, 7, 2, 1]
    # Capped: two slices take n - 1 above the minimum, the rest is split between the other two.
    assert change_split(0.9, [0.0, 1.0, 0.01, 0.01], 16) == [16, 16, 13, 13]


@pytest.mark.parametrize("budget", [0.1, 0.5, 1.0, 3, 40])
def test_no_change_is_the_even_split(budget):
    assert change_split(budget, [0.0] * 5, 16) == budget_split(budget, 5, 16)


@given(
    changes=st.lists(st.floats(0.0, 2.0, allow_subnormal=False), min_size=1, max_size=24),
    n=st.integers(1, 64),
    budget=st.one_of(st.floats(0.01, 1.0), st.integers(1, 2000)),
)
def test_change_split_properties(changes, n, budget):
    shares = change_split(budget, changes, n)
    k = len(changes)
    assert sum(shares) == sum(budget_split(budget, k, n))
    assert all(1 <= s <= n for s in shares)
    weights = [max(changes[1:])] + changes[1:] if k > 1 else changes
    # More change never gets fewer tokens.
    for i in range(k):
        for j in range(k):
            if weights[i] > weights[j]:
                assert shares[i] >= shares[j], (i, j, shares)
    # Uncapped, each share is within one token of its proportional part.
    extra, total = sum(shares) - k, sum(weights)
    if total > 0 and all(extra * w / total < n - 1 for w in weights):
        for share, w in zip(shares, weights, strict=True):
            assert abs(share - 1 - extra * w / total) < 1


def test_change_split_rejects_bad_changes():
    with pytest.raises(ValueError, match="changes must be finite"):
        change_split(0.5, [0.0, float("nan")], 4)
    with pytest.raises(ValueError, match="changes must be finite"):
        change_split(0.5, [0.0, -1.0], 4)


@pytest.mark.parametrize(
    "fields, error, match",
    [
        ({"iaf": "max"}, ValueError, "iaf must be one of"),
        ({"gamma_local": float("inf")}, ValueError, "gamma_local must be finite"),
        ({"gamma_local": "0.1"}, TypeError, "gamma_local"),
        ({"iaf_block": 0}, ValueError, "iaf_block must be >= 1"),
        ({"iaf_block": 2.0}, TypeError, "iaf_block"),
        ({"allocation": "attention"}, ValueError, "allocation must be one of"),
        ({"allocation": "change"}, ValueError, "set budget"),
        ({"mode": "paper", "iaf": "local"}, ValueError, "mode='paper'"),
        ({"mode": "paper", "allocation": "change", "budget": 0.5}, ValueError, "mode='paper'"),
    ],
)
def test_config_rejects_bad_variant_fields(fields, error, match):
    with pytest.raises(error, match=match):
        MedPrunerConfig(**fields)


def test_variant_fields_round_trip_through_json():
    config = MedPrunerConfig(iaf="local", gamma_local=0.2, iaf_block=96, allocation="change", budget=0.3)
    assert MedPrunerConfig.from_json(config.to_json()) == config


# ------------------------------------------------------------------------------ in the pipeline
FAMILIES = {
    "qwen3_vl": (tiny_qwen3_vl, functools.partial(qwen_processor, "qwen3_vl"), qwen_volume_inputs),
    "qwen2_5_vl": (
        tiny_qwen2_5_vl,
        functools.partial(qwen_processor, "qwen2_5_vl", clip_norm=True),
        qwen_volume_inputs,
    ),
    "gemma3": (tiny_gemma3, gemma_processor, gemma_volume_inputs),
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    build, processor, volume_inputs = FAMILIES[request.param]
    model = build()
    volumes = [synthetic_volume(7, seed=3), synthetic_volume(4, seed=4)]
    # A small bright square in one slice of each volume: the finding the local rule must keep.
    volumes[0][4, 8:16, 8:16] = 1.0
    volumes[1][2, 40:48, 40:48] = 1.0
    inputs = volume_inputs(processor(), volumes)
    yield request.param, model, inputs
    remove_medpruner(model)


def _blocked_pixels(name, model, inputs):
    """(per image rows on the paper scale, each LLM token's pixels contiguous, block size, images per
    volume), from the model's own configuration."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
    is_image = (ids == model.config.image_token_id) & mask
    starts = is_image & ~torch.nn.functional.pad(is_image[:, :-1], (1, 0))
    per_row = starts.sum(1).tolist()
    num_images = sum(per_row)
    pixels = paper_scale_pixels(model, inputs["pixel_values"], num_images)
    if name == "gemma3":
        size = inputs["pixel_values"].shape[-1]
        side = int(round(model.config.mm_tokens_per_image**0.5))
        tile = size // side
        tiled = pixels.reshape(num_images, 3, side, tile, side, tile).permute(0, 2, 4, 1, 3, 5)
        return tiled.reshape(num_images, -1), 3 * tile * tile, per_row
    merge = model.config.vision_config.spatial_merge_size
    return pixels, merge * merge * inputs["pixel_values"].shape[1], per_row


def _expected(name, model, inputs, rule, threshold, budget, allocation):
    """Per volume, the tokens each slice keeps, from the float64 IAF references and the host rules."""
    pixels, block, per_row = _blocked_pixels(name, model, inputs)
    cu = torch.tensor([0] + torch.tensor(per_row).cumsum(0).tolist())
    if rule == "local":
        keep, distance = reference.iaf_local_select(pixels, threshold, cu, block)
    else:
        keep, distance = reference.iaf_select(pixels, threshold, cu)
    n = model.config.mm_tokens_per_image if name == "gemma3" else None
    counts = []
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        kept = [i for i in range(a, b) if keep[i]]
        tokens = n or int(inputs["image_grid_thw"][a].prod()) // 4
        if allocation == "change":
            split = change_split(budget, [float(distance[i]) for i in kept], tokens)
        else:
            split = budget_split(budget, len(kept), tokens)
        shares = dict(zip(kept, split, strict=True))
        counts.append([shares.get(i, 0) for i in range(a, b)])
    return counts


def _local_gamma(name, model, inputs):
    """A gamma_local between the adjacent slices' local distances: some kept, some dropped."""
    pixels, block, _ = _blocked_pixels(name, model, inputs)
    adjacent = (pixels[1:] - pixels[:-1]).abs().reshape(pixels.shape[0] - 1, -1, block).mean(2).amax(1)
    return float(adjacent.median())


@pytest.mark.parametrize("rule, allocation", [("local", "even"), ("local", "change"), ("mean", "change")])
@pytest.mark.parametrize("budget, merge", [(0.3, True), (5, False)])
def test_variants_keep_the_reference_slices_and_counts(family, rule, allocation, budget, merge):
    name, model, inputs = family
    threshold = _local_gamma(name, model, inputs) if rule == "local" else 0.05
    knobs = {"gamma_local": threshold} if rule == "local" else {"gamma": threshold}
    apply_medpruner(model, iaf=rule, allocation=allocation, budget=budget, merge=merge, backend=BACKEND, **knobs)
    with torch.no_grad():
        logits = model(**inputs).logits
    stats = model.medpruner_stats
    assert stats.tokens_per_slice == _expected(name, model, inputs, rule, threshold, budget, allocation)
    assert 0 < sum(stats.slices_kept) < sum(stats.slices_total)
    assert logits.shape[1] < inputs["input_ids"].shape[1]


def test_local_rule_keeps_the_small_finding_the_mean_rule_drops(family):
    name, model, _ = family
    _, processor, volume_inputs = FAMILIES[name]
    # One slice repeated with faint noise; slice 4 alone holds a bright 8x8 square (1/64 of its area).
    base = synthetic_volume(1, seed=5)[0]
    volume = base + 0.002 * torch.rand(8, *base.shape, generator=torch.Generator().manual_seed(6))
    volume[4, 24:32, 24:32] = 1.0
    inputs = volume_inputs(processor(), [volume.clamp(0, 1)])
    kept = {}
    for rule, knobs in (("mean", {"gamma": 0.05}), ("local", {"gamma_local": 0.1})):
        apply_medpruner(model, iaf=rule, backend=BACKEND, **knobs)
        with torch.no_grad():
            model(**inputs)
        kept[rule] = [i for i, count in enumerate(model.medpruner_stats.tokens_per_slice[0]) if count]
    assert kept["mean"] == [0]
    # The square appears in slice 4 and is gone again in slice 5 (compared with anchor 4).
    assert kept["local"] == [0, 4, 5]


def test_generate_runs_with_the_variants(family):
    _, model, inputs = family
    apply_medpruner(model, iaf="local", gamma_local=0.3, allocation="change", budget=0.4, backend=BACKEND)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3


# ------------------------------------------------------------------------------ as eval methods
@pytest.mark.parametrize("method", ["medpruner_local", "medpruner_change", "medpruner_local_change",
                                    "medpruner_attention"])
@pytest.mark.parametrize("budget", [9, 40])
def test_variant_selectors_match_the_references(method, budget):
    from medpruner.selectors import get_selector

    g = torch.Generator().manual_seed(7)
    slices, tokens, block = 10, 16, 4
    pixels = torch.rand(slices, 8, 8, generator=g) * 2 - 1
    pixels[1::2] = pixels[0::2] + 0.02 * torch.randn(5, 8, 8, generator=g)
    pixels[5, :2, :4] += 0.8  # a change confined to two blocks
    # slices as peaked as 1 token or as flat as 16: nucleus sizes that differ, for the attention split
    peaks = 1 + 8 * torch.rand(slices, 1, generator=g)
    scores = torch.rand(slices, tokens, generator=g).pow(peaks).flatten()
    keys = torch.randn(slices * tokens, 8, generator=g)
    slice_cu = torch.arange(0, slices * tokens + 1, tokens, dtype=torch.int32)
    local = "local" in method
    knobs = {"gamma_local": 0.3, "iaf_block": block} if local else {"gamma": 0.05}
    result = get_selector(method).select(
        scores, keys, None, slice_cu, budget, slice_pixels=pixels, backend="torch", **knobs
    )
    flat = pixels.reshape(slices, -1).double()
    cu = torch.tensor([0, slices])
    if local:
        keep, change = reference.iaf_local_select(flat, 0.3, cu, block)
    else:
        keep, change = reference.iaf_select(flat, 0.05, cu)
    assert torch.equal(result.slice_keep, keep)
    kept = keep.nonzero().flatten().tolist()
    if method == "medpruner_local":
        shares = budget_split(budget, len(kept), tokens)
    elif method == "medpruner_attention":
        # the attention split: each kept slice's nucleus size at tau 0.9 (masses scores / sum)
        sizes = [reference.nucleus_count(reference.nucleus_probabilities(scores[i * tokens:(i + 1) * tokens], None),
                                         0.9, 1, None) for i in kept]
        shares = proportional_split(budget, sizes, tokens)
        assert len(set(sizes)) > 1 and len(set(shares)) > 1, "the attention split must be exercised"
    else:
        shares = change_split(budget, [float(change[i]) for i in kept], tokens)
    per_slice = result.token_keep.view(slices, tokens).sum(1)
    assert per_slice[kept].tolist() == shares
    assert int(per_slice.sum()) == sum(shares)
