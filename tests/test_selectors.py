"""Selectors of the eval against float64 loop references written from their docstrings, plus the
properties every method shares (the stages, the budgets, the checks)."""

from __future__ import annotations

import math

import pytest
import torch
from medpruner.selectors import SELECTORS, get_selector

GRID = (4, 4)
N_PER_SLICE = GRID[0] * GRID[1]
# The kernels' backends agree with each other in their own tests; here the selectors' logic is under test
# (the MedPruner reference tests also run the default backend).
KERNEL = {"backend": "torch"}
KERNEL_METHODS = ("medpruner", "medpruner_budget", "iaf", "dins")


def options(name):
    # make_sample's 8x8 slices hold 16 tokens: 4 pixel values a token
    blocks = {"iaf_block": 4} if "iaf_block" in get_selector(name).options() else {}
    return {**(KERNEL if name in KERNEL_METHODS else {}), **blocks}


# ----------------------------------------------------------------------------------------- inputs
def make_sample(num_slices=6, n=N_PER_SLICE, dk=8, d=12, seed=0, repeats=True, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    total = num_slices * n
    scores = torch.rand(total, generator=g, dtype=torch.float64).pow(3).to(dtype) * 4
    keys = torch.randn(total, dk, generator=g, dtype=torch.float64).to(dtype)
    features = torch.randn(total, d, generator=g, dtype=torch.float64).to(dtype)
    slice_cu = torch.arange(0, total + 1, n, dtype=torch.int32)
    pixels = torch.rand(num_slices, 8, 8, generator=g, dtype=torch.float64) * 2 - 1
    if repeats:
        # Pairs of near-identical slices: IAF drops the second of each pair at gamma = 0.05.
        pixels[1::2] = pixels[0::2][: pixels[1::2].shape[0]] + 0.01 * torch.randn(
            pixels[1::2].shape, generator=g, dtype=torch.float64
        )
    return scores, keys, features, slice_cu, pixels.to(dtype)


def segments(slice_cu):
    cu = slice_cu.tolist()
    return list(zip(cu[:-1], cu[1:]))


# ------------------------------------------------------------------------------------- references
def ref_iaf(pixels, gamma):
    x = pixels.double().flatten(1)
    keep = [True]
    anchor = 0
    for s in range(1, x.shape[0]):
        d = float((x[s] - x[anchor]).abs().mean())
        keep.append(d > gamma)
        if d > gamma:
            anchor = s
    return torch.tensor(keep)


def ref_ranked(values):
    """Indices by value descending, ties: lower index (a plain Python sort)."""
    return sorted(range(len(values)), key=lambda i: (-values[i], i))


def ref_nucleus_count(values, tau, temperature):
    if temperature is None:
        total = sum(values)
        p = [v / total for v in values] if total > 0 else [0.0] * len(values)
    else:
        m = max(values)
        e = [math.exp((v - m) / temperature) for v in values]
        p = [v / sum(e) for v in e]
    if tau >= 1:
        return len(values), p
    if sum(p) == 0:
        return 1, p
    cumulative, count = 0.0, 0
    for i in ref_ranked(p):
        cumulative += p[i]
        count += 1
        if cumulative >= tau:
            break
    return count, p


def ref_merge_slice(x, keys, keep, num_targets, average_with_target=False):
    """Contextual merge of one slice (lists/tensors of float64): targets at stride from the unkept tokens."""
    rest = [i for i in range(len(keep)) if not keep[i]]
    out = x.clone()
    keep = list(keep)
    if not rest or num_targets == 0:
        return out, keep
    stride = max(1, len(rest) // num_targets)
    targets = rest[::stride][:num_targets]
    members = {t: [] for t in targets}
    unit = torch.nn.functional.normalize(keys, dim=1)
    for r in rest:
        if r in targets:
            continue
        sims = [float(unit[r] @ unit[t]) for t in targets]
        members[targets[sims.index(max(sims))]].append(r)
    for t in targets:
        keep[t] = True
        if members[t]:
            if average_with_target:
                out[t] = (x[t] + sum(x[m] for m in members[t])) / (1 + len(members[t]))
            else:
                out[t] = x[t] + sum(x[m] for m in members[t]) / len(members[t])
    return out, keep


def ref_medpruner(
    scores, keys, features, slice_cu, pixels, *, gamma, tau, temperature, merge, context_frac, budget=None
):
    slice_keep = ref_iaf(pixels, gamma) if pixels is not None else torch.ones(slice_cu.numel() - 1, dtype=torch.bool)
    keep = [False] * scores.numel()
    out = features.double().clone()
    kept_rows = [i for i, k in enumerate(slice_keep.tolist()) if k]
    n = int(slice_cu[1] - slice_cu[0])
    if budget is not None:
        k = len(kept_rows)
        total = math.ceil(budget * k * n) if isinstance(budget, float) else budget
        total = min(max(total, k), k * n)
        shares = [total // k + (1 if i < total % k else 0) for i in range(k)]
    for j, s in enumerate(kept_rows):
        start, end = segments(slice_cu)[s]
        values = scores[start:end].double().tolist()
        if budget is None:
            count, p = ref_nucleus_count(values, tau, temperature)
            targets = max(int(context_frac * (end - start)), 1) if merge else 0
        else:
            b = shares[j]
            targets = max(min(b - 1, max(int(context_frac * n), 1)), 0) if merge else 0
            count, p = b - targets, values
        local = [False] * (end - start)
        for i in ref_ranked(p)[:count]:
            local[i] = True
        x_slice, local = ref_merge_slice(features[start:end].double(), keys[start:end].double(), local, targets)
        out[start:end] = x_slice
        keep[start:end] = local
    return slice_keep, torch.tensor(keep), out


# ------------------------------------------------------------------------------------- medpruner
@pytest.mark.parametrize("num_slices", [1, 6, 9])
@pytest.mark.parametrize("tau", [0.3, 0.9, 1.0])
@pytest.mark.parametrize("merge", [True, False])
@pytest.mark.parametrize("temperature", [None, 2.0])
@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_medpruner_adaptive_matches_reference(num_slices, tau, merge, temperature, backend):
    scores, keys, features, slice_cu, pixels = make_sample(num_slices, seed=num_slices)
    result = get_selector("medpruner").select(
        scores,
        keys,
        features,
        slice_cu,
        None,
        slice_pixels=pixels,
        tau=tau,
        merge=merge,
        temperature=temperature,
        backend=backend,
    )
    slice_keep, keep, out = ref_medpruner(
        scores,
        keys,
        features,
        slice_cu,
        pixels,
        gamma=0.05,
        tau=tau,
        temperature=temperature,
        merge=merge,
        context_frac=0.05,
    )
    assert torch.equal(result.slice_keep, slice_keep)
    assert torch.equal(result.token_keep, keep)
    torch.testing.assert_close(result.features[keep].double(), out[keep], rtol=1e-5, atol=1e-5)
    if num_slices > 1:
        assert 0 < result.stages["slices_kept"] < num_slices  # the pairs make IAF drop slices


@pytest.mark.parametrize("budget", [1, 7, 13, 40, 0.05, 0.3, 1.0, 10_000])
@pytest.mark.parametrize("merge", [True, False])
@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_medpruner_budget_matches_reference(budget, merge, backend):
    scores, keys, features, slice_cu, pixels = make_sample(7, seed=3)
    result = get_selector("medpruner_budget").select(
        scores, keys, features, slice_cu, budget, slice_pixels=pixels, merge=merge, context_frac=0.2, backend=backend
    )
    slice_keep, keep, out = ref_medpruner(
        scores,
        keys,
        features,
        slice_cu,
        pixels,
        gamma=0.05,
        tau=1.0,
        temperature=None,
        merge=merge,
        context_frac=0.2,
        budget=budget,
    )
    assert torch.equal(result.slice_keep, slice_keep)
    assert torch.equal(result.token_keep, keep)
    torch.testing.assert_close(result.features[keep].double(), out[keep], rtol=1e-5, atol=1e-5)
    k = int(slice_keep.sum())
    expected = min(max(math.ceil(budget * k * 16) if isinstance(budget, float) else budget, k), k * 16)
    assert result.kept_tokens == expected


def test_iaf_and_dins_are_the_two_stages_of_medpruner():
    scores, keys, features, slice_cu, pixels = make_sample(8, seed=5)
    full = get_selector("medpruner").select(scores, keys, features, slice_cu, None, slice_pixels=pixels, **KERNEL)
    iaf = get_selector("iaf").select(scores, keys, features, slice_cu, None, slice_pixels=pixels, **KERNEL)
    dins = get_selector("dins").select(scores, keys, features, slice_cu, None, **KERNEL)
    _, dins_ref, _ = ref_medpruner(
        scores, keys, features, slice_cu, None, gamma=0.05, tau=0.9, temperature=None, merge=True, context_frac=0.05
    )
    assert torch.equal(iaf.slice_keep, ref_iaf(pixels, 0.05))
    assert torch.equal(iaf.token_keep, iaf.slice_keep.repeat_interleave(16))
    assert bool(dins.slice_keep.all()) and torch.equal(dins.token_keep, dins_ref)
    # DINS is per slice, so MedPruner = DINS restricted to the slices IAF keeps.
    assert torch.equal(full.token_keep, dins.token_keep & iaf.token_keep)
    assert full.stages["tokens_after_slice_stage"] == iaf.kept_tokens


# ------------------------------------------------------------------------------------- baselines
@pytest.mark.parametrize("budget", [1, 5, 16, 47, 96, 500])
def test_uniform_slices_matches_reference(budget):
    scores, keys, features, slice_cu, _ = make_sample(6)
    result = get_selector("uniform_slices").select(scores, keys, features, slice_cu, budget)
    count = min(max(round(min(budget, 96) / 16), 1), 6)
    picked = [math.floor((i + 0.5) * 6 / count) for i in range(count)]
    expected = torch.tensor([s in picked for s in range(6)])
    assert torch.equal(result.slice_keep, expected)
    assert torch.equal(result.token_keep, expected.repeat_interleave(16))
    # To within half a slice, except that at least one slice is kept.
    assert abs(result.kept_tokens - min(budget, 96)) <= 8 or result.kept_tokens == 16


@pytest.mark.parametrize("budget", [1, 10, 37, 96])
def test_topk_matches_reference(budget):
    scores, keys, features, slice_cu, _ = make_sample(6)
    scores[5] = scores[9] = scores[60] = scores.max()  # ties at the top: lower index first
    result = get_selector("topk").select(scores, keys, features, slice_cu, budget)
    expected = torch.zeros(96, dtype=torch.bool)
    expected[ref_ranked(scores.double().tolist())[:budget]] = True
    assert torch.equal(result.token_keep, expected)
    assert result.features is features


def test_random_is_seeded_and_uniform():
    scores, keys, features, slice_cu, _ = make_sample(4)
    select = get_selector("random").select
    first = select(scores, keys, features, slice_cu, 10, generator=torch.Generator().manual_seed(7))
    again = select(scores, keys, features, slice_cu, 10, generator=torch.Generator().manual_seed(7))
    other = select(scores, keys, features, slice_cu, 10, generator=torch.Generator().manual_seed(8))
    assert torch.equal(first.token_keep, again.token_keep) and not torch.equal(first.token_keep, other.token_keep)
    assert first.kept_tokens == 10
    trials = 2000
    hits = torch.zeros(64)
    for seed in range(trials):
        hits += select(scores, keys, features, slice_cu, 10, generator=torch.Generator().manual_seed(seed)).token_keep
    # Each token is kept with probability 10/64; a binomial count stays within 5 sigma of its mean.
    mean = trials * 10 / 64
    sigma = math.sqrt(trials * (10 / 64) * (54 / 64))
    assert float((hits - mean).abs().max()) < 5 * sigma


@pytest.mark.parametrize("budget", [1, 2, 9, 30, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_visionzip_matches_reference(budget, dtype):
    scores, keys, features, slice_cu, _ = make_sample(4, dtype=dtype)
    result = get_selector("visionzip").select(scores, keys, features, slice_cu, budget)
    contextual = max(1, round(budget * 10 / 64)) if budget > 1 else 0
    dominant = ref_ranked(scores.double().tolist())[: budget - contextual]
    keep = [i in dominant for i in range(64)]
    out, keep = ref_merge_slice(features.double(), keys.double(), keep, contextual, average_with_target=True)
    assert torch.equal(result.token_keep, torch.tensor(keep))
    assert result.kept_tokens == budget
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(result.features.double(), out, rtol=tol, atol=tol)


def ref_divprune(vectors, budget):
    unit = torch.nn.functional.normalize(vectors.double(), dim=1)
    n = unit.shape[0]
    dist = [[1 - float(unit[i] @ unit[j]) for j in range(n)] for i in range(n)]
    nearest = [min((dist[i][j] for j in range(n) if j != i), default=math.inf) for i in range(n)]
    chosen = [max(range(n), key=lambda i: (nearest[i], -i))]
    while len(chosen) < budget:
        rest = [i for i in range(n) if i not in chosen]
        chosen.append(max(rest, key=lambda i: (min(dist[i][c] for c in chosen), -i)))
    return chosen


@pytest.mark.parametrize("budget", [1, 4, 17, 48])
@pytest.mark.parametrize("with_features", [True, False])
def test_divprune_matches_reference(budget, with_features):
    scores, keys, features, slice_cu, _ = make_sample(3, dtype=torch.float64)
    result = get_selector("divprune").select(scores, keys, features if with_features else None, slice_cu, budget)
    expected = torch.zeros(48, dtype=torch.bool)
    expected[ref_divprune(features if with_features else keys, budget)] = True
    assert torch.equal(result.token_keep, expected)


def test_divprune_picks_one_of_each_cluster():
    # Three tight clusters of directions: three picks must cover all three.
    centres = torch.eye(3, dtype=torch.float64)
    vectors = centres.repeat_interleave(16, 0) + 0.01 * torch.randn(48, 3, dtype=torch.float64)
    slice_cu = torch.tensor([0, 16, 32, 48], dtype=torch.int32)
    result = get_selector("divprune").select(torch.ones(48, dtype=torch.float64), vectors, None, slice_cu, 3)
    assert sorted(i // 16 for i in result.token_keep.nonzero().flatten().tolist()) == [0, 1, 2]


@pytest.mark.parametrize("budget", [3, 16, 20, 60])
@pytest.mark.parametrize("with_features", [True, False])
def test_evs_matches_reference(budget, with_features):
    scores, keys, features, slice_cu, _ = make_sample(4, dtype=torch.float64)
    vectors = features if with_features else keys
    result = get_selector("evs").select(scores, keys, features if with_features else None, slice_cu, budget)
    change = []
    for s in range(4):
        for t in range(16):
            if s == 0:
                change.append(2.0)
            else:
                a, b = vectors[s * 16 + t], vectors[(s - 1) * 16 + t]
                change.append(1 - float(a @ b / (a.norm() * b.norm())))
    expected = torch.zeros(64, dtype=torch.bool)
    expected[ref_ranked(change)[:budget]] = True
    assert torch.equal(result.token_keep, expected)


def test_evs_keeps_what_moved():
    keys = torch.randn(16, 4).repeat(3, 1)
    keys[16 + 5] = -keys[5]  # token 5 of slice 1 changes; all else is static
    slice_cu = torch.tensor([0, 16, 32, 48], dtype=torch.int32)
    result = get_selector("evs").select(torch.ones(48), keys, None, slice_cu, 17)
    assert result.token_keep[:16].all() and result.token_keep[21] and result.kept_tokens == 17


def ref_hiprune(scores, register_scores, budget, n, h, w, anchor_frac):
    ranked = ref_ranked(scores)
    anchors = ranked[: max(1, int(anchor_frac * budget))]
    chosen = list(anchors)
    for a in anchors:
        s, p = divmod(a, n)
        r, c = divmod(p, w)
        for dr, dc in ((-1, 0), (1, 0), (0, -1), (0, 1)):
            if 0 <= r + dr < h and 0 <= c + dc < w:
                t = s * n + (r + dr) * w + c + dc
                if t not in chosen and len(chosen) < budget:
                    chosen.append(t)
    for t in ref_ranked(register_scores):
        if len(chosen) >= budget:
            break
        if t not in chosen:
            chosen.append(t)
    return chosen


@pytest.mark.parametrize("budget", [1, 2, 3, 6, 20, 50, 96])
@pytest.mark.parametrize("anchor_frac", [0.1, 0.3])
@pytest.mark.parametrize("grid", [None, (2, 8)])
def test_hiprune_matches_reference(budget, anchor_frac, grid):
    scores, keys, features, slice_cu, _ = make_sample(6, seed=budget)
    registers = torch.rand(96)
    result = get_selector("hiprune").select(
        scores, keys, features, slice_cu, budget, grid=grid, anchor_frac=anchor_frac, register_scores=registers
    )
    h, w = grid or (4, 4)
    expected = torch.zeros(96, dtype=torch.bool)
    expected[ref_hiprune(scores.tolist(), registers.tolist(), budget, 16, h, w, anchor_frac)] = True
    assert torch.equal(result.token_keep, expected)
    assert result.kept_tokens == budget


# ------------------------------------------------------------------------------------- shared
BUDGETED = sorted(name for name, spec in SELECTORS.items() if spec.budgeted)


@pytest.mark.parametrize("name", sorted(SELECTORS))
def test_every_selector_reports_consistent_stages(name):
    scores, keys, features, slice_cu, pixels = make_sample(6, seed=11)
    spec = get_selector(name)
    result = spec.select(scores, keys, features, slice_cu, 20, slice_pixels=pixels, **options(name))
    tokens_of_dropped = ~result.slice_keep.repeat_interleave(16)
    assert not bool((result.token_keep & tokens_of_dropped).any())
    assert result.stages["tokens_kept"] == int(result.token_keep.sum())
    assert result.stages["slices_kept"] == int(result.slice_keep.sum())
    assert result.stages["tokens_after_slice_stage"] == 16 * int(result.slice_keep.sum())
    if not spec.slice_stage:
        assert bool(result.slice_keep.all())
    if not spec.token_stage:
        assert result.stages["tokens_kept"] == result.stages["tokens_after_slice_stage"]
    assert result.features.shape == features.shape
    if name in BUDGETED and name != "uniform_slices":
        assert result.kept_tokens == 20


@pytest.mark.parametrize("name", BUDGETED)
def test_budgeted_selectors_need_a_budget(name):
    scores, keys, features, slice_cu, pixels = make_sample(2)
    select = get_selector(name).select
    for bad in (None, 0, -3, True, "10"):
        with pytest.raises(ValueError, match="budget"):
            select(scores, keys, features, slice_cu, bad, slice_pixels=pixels, **options(name))


@pytest.mark.parametrize("name", sorted(SELECTORS))
def test_bad_inputs_name_the_argument(name):
    scores, keys, features, slice_cu, pixels = make_sample(2)
    select = get_selector(name).select
    cases = [
        (dict(scores=scores[:-1]), "keys"),
        (dict(scores=scores.to(torch.int64)), "scores"),
        (dict(scores=torch.where(scores > 1, float("nan"), scores)), "scores"),
        (dict(keys=keys[:, 0]), "keys"),
        (dict(features=features[:-1]), "features"),
        (dict(slice_cu=slice_cu.long()), "slice_cu"),
        (dict(slice_cu=torch.tensor([0, 20, 31], dtype=torch.int32)), "slice_cu"),
        (dict(slice_pixels=pixels[:1]), "slice_pixels"),
    ]
    for change, word in cases:
        args = dict(scores=scores, keys=keys, features=features, slice_cu=slice_cu, slice_pixels=pixels)
        args.update(change)
        with pytest.raises(ValueError, match=word):
            select(
                args["scores"],
                args["keys"],
                args["features"],
                args["slice_cu"],
                8,
                slice_pixels=args["slice_pixels"],
                **options(name),
            )


def test_iaf_methods_need_pixels_and_one_grid_methods_check_it():
    scores, keys, features, slice_cu, _ = make_sample(2)
    for name in ("medpruner", "medpruner_budget", "iaf"):
        with pytest.raises(ValueError, match="slice_pixels"):
            get_selector(name).select(scores, keys, features, slice_cu, 8, **KERNEL)
    ragged = torch.tensor([0, 10, 32], dtype=torch.int32)
    for name in ("evs", "hiprune"):
        with pytest.raises(ValueError, match="same token count"):
            get_selector(name).select(scores, keys, features, ragged, 8)
    with pytest.raises(ValueError, match="grid"):
        get_selector("hiprune").select(scores, keys, features, slice_cu, 8, grid=(3, 5))
    with pytest.raises(ValueError, match="method must be one of"):
        get_selector("nope")
