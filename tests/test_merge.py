"""merge_tokens against the float64 reference, on every backend here."""

import itertools
import math

import pytest
import torch
from conftest import DEVICE, available_backends
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from medpruner_kernels import merge as merge_module
from medpruner_kernels import reference
from medpruner_kernels.merge import merge_tokens

# The C++ kernel is CPU-only: on a GPU machine the cpp backend is not one of this op's CUDA paths.
BACKENDS = [b for b in available_backends(cpp_ops=merge_module.CPP_OPS) if b != "cpp" or DEVICE.type == "cpu"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Every backend sums in float32 (or double) and rounds once to x.dtype: one unit in the last place of
# the output dtype (relative to the largest feature) absorbs that final rounding; the 2x rule bounds the rest.
FLOOR = {torch.float32: 1e-6, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
# The Triton and torch paths compare similarities in float32: a member's choice may legitimately differ
# from float64 when its two best targets are closer than this, so deterministic inputs must avoid it.
DECISION_GAP = 1e-5
STRUCTURES = {
    "one-segment": [96],
    "varlen-1-token": [1, 30, 1, 0, 17, 1, 26],
    "many-segments": [5, 3, 8, 4, 6, 7, 2, 9, 5, 3, 4, 8],
}


# ------------------------------------------------------------------------------------------ helpers
def cu_of(lengths, device=DEVICE):
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)


def random_inputs(num_tokens, feat_dim, key_dim, dtype, keep_fraction=0.3, key_dtype=torch.float32):
    x = (torch.randn(num_tokens, feat_dim) * 2).to(dtype).to(DEVICE)
    keys = torch.randn(num_tokens, key_dim).to(key_dtype).to(DEVICE)
    keep = (torch.rand(num_tokens) < keep_fraction).to(DEVICE)
    return x, keys, keep


def merge_plan(keys, keep, cu, context_frac, num_targets=None):
    """The documented rule, derived here in float64: the target mask, each member's target token (-1
    for non-members), and the smallest non-zero gap between a member's two best similarities."""
    keep = keep.cpu()
    unit = torch.nn.functional.normalize(keys.cpu().double(), dim=-1)
    targets = torch.zeros(keep.numel(), dtype=torch.bool)
    owner = torch.full((keep.numel(),), -1, dtype=torch.int64)
    gap = math.inf
    for b, (start, end) in enumerate(reference.segments(cu.cpu())):
        rest = (~keep[start:end]).nonzero().flatten() + start
        count = max(int(context_frac * (end - start)), 1) if num_targets is None else int(num_targets[b])
        if rest.numel() == 0 or count == 0:
            continue
        chosen = rest[:: max(1, rest.numel() // count)][:count]
        targets[chosen] = True
        members = rest[~targets[rest]]
        if members.numel() == 0:
            continue
        similarity = unit[members] @ unit[chosen].T
        owner[members] = chosen[similarity.argmax(dim=1)]
        if chosen.numel() > 1:
            best_two = similarity.topk(2, dim=1).values
            nonzero = (best_two[:, 0] - best_two[:, 1])[best_two[:, 0] > best_two[:, 1]]
            if nonzero.numel():
                gap = min(gap, nonzero.min().item())
    return targets, owner, gap


def merged_in_dtype(x, targets, owner):
    """What torch computes in x's own dtype with the float64 decisions: the low-precision yardstick."""
    x = x.cpu()
    out = x.clone()
    for t in targets.nonzero().flatten().tolist():
        members = (owner == t).nonzero().flatten()
        if members.numel():
            out[t] = x[t] + x[members].mean(dim=0)
    return out


def assert_matches_reference(x, keys, keep, cu, context_frac, x_out, keep_out, num_targets=None):
    targets, owner, gap = merge_plan(keys, keep, cu, context_frac, num_targets)
    assert gap > DECISION_GAP, "test inputs put a member within float32 rounding of a tie; change them"
    ref_x, ref_keep = reference.merge_tokens(
        x.cpu(), keys.cpu(), keep.cpu(), cu.cpu(), context_frac=context_frac,
        num_targets=None if num_targets is None else num_targets.cpu(),
    )  # fmt: skip
    assert torch.equal(ref_keep, keep.cpu() | targets)
    assert keep_out.dtype == torch.bool and torch.equal(keep_out.cpu(), keep.cpu() | targets)
    assert x_out.dtype == x.dtype and x_out.shape == x.shape
    # Order never changes: every row that is not a target is x itself, bit for bit.
    assert torch.equal(x_out.cpu()[~targets], x.cpu()[~targets])
    if x.numel() == 0:
        return
    error = (x_out.cpu().double() - ref_x).abs().max().item()
    own = (merged_in_dtype(x, targets, owner).double() - ref_x).abs().max().item()
    bound = 2 * own + FLOOR[x.dtype] * max(1.0, ref_x.abs().max().item())
    assert error <= bound, f"max error {error:.3g} > {bound:.3g} (torch's own {x.dtype} error {own:.3g})"


def run_and_check(x, keys, keep, cu, context_frac, backend, num_targets=None):
    x_out, keep_out = merge_tokens(
        x, keys, keep, cu_seqlens=cu, context_frac=context_frac, num_targets=num_targets, backend=backend
    )
    assert_matches_reference(x, keys, keep, cu, context_frac, x_out, keep_out, num_targets)
    return x_out, keep_out


# ------------------------------------------------------------------------------------- vs reference
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("structure", list(STRUCTURES))
@pytest.mark.parametrize("context_frac", [0.05, 0.2])
def test_random_inputs(backend, dtype, structure, context_frac):
    lengths = STRUCTURES[structure]
    x, keys, keep = random_inputs(sum(lengths), 72, 40, dtype)
    run_and_check(x, keys, keep, cu_of(lengths), context_frac, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("feat_dim, key_dim", [(80, 64), (128, 72), (40, 1), (3, 130)])
@pytest.mark.parametrize("keep_fraction", [0.0, 0.5, 0.9])
def test_feature_and_key_widths(backend, feat_dim, key_dim, keep_fraction):
    lengths = [60, 1, 35]
    x, keys, keep = random_inputs(sum(lengths), feat_dim, key_dim, torch.float32, keep_fraction)
    run_and_check(x, keys, keep, cu_of(lengths), 0.1, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("key_dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_key_dtypes(backend, key_dtype):
    lengths = [50, 30]
    x, keys, keep = random_inputs(sum(lengths), 24, 32, torch.bfloat16, key_dtype=key_dtype)
    run_and_check(x, keys, keep, cu_of(lengths), 0.1, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("context_frac", [0.0, 0.5, 1.0, 3.0])
def test_context_fraction_extremes(backend, context_frac):
    # 0 still gives one target per slice; >= the unkept share makes every unkept token a target.
    lengths = [40, 7, 1]
    x, keys, keep = random_inputs(sum(lengths), 16, 8, torch.float32, keep_fraction=0.4)
    x_out, keep_out = run_and_check(x, keys, keep, cu_of(lengths), context_frac, backend)
    if context_frac >= 1.0:
        assert bool(keep_out.all())
        assert torch.equal(x_out, x)


# ------------------------------------------------------------------------------- structured inputs
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_all_kept_none_kept_and_one_token_slices(backend, dtype):
    lengths = [20, 40, 1, 1, 0, 30]
    n = sum(lengths)
    x, keys, _ = random_inputs(n, 32, 16, dtype)
    keep = torch.zeros(n, dtype=torch.bool)
    keep[:20] = True  # all kept
    keep[60] = True  # the kept 1-token slice; token 61 is the unkept one
    keep[62::3] = True
    keep = keep.to(DEVICE)
    cu = cu_of(lengths)
    x_out, keep_out = run_and_check(x, keys, keep, cu, 0.05, backend)
    x_out, keep_out, x = x_out.cpu(), keep_out.cpu(), x.cpu()
    assert torch.equal(x_out[:20], x[:20]) and bool(keep_out[:20].all())
    # None kept, 40 tokens: C = 2 targets at stride 20 (tokens 20 and 40), everything else merged.
    assert keep_out[20:60].nonzero().flatten().tolist() == [0, 20]
    assert torch.equal(keep_out[60:62], torch.tensor([True, True]))
    assert torch.equal(x_out[60:62], x[60:62])


@pytest.mark.parametrize("backend", BACKENDS)
def test_duplicate_keys_tie_to_the_lowest_target(backend):
    # One slice of 40 unkept tokens, context_frac 0.1: 4 targets at stride 10 (tokens 0, 10, 20, 30).
    # Targets 10 and 30 share a key, and every member carries that key: each similarity is an exact tie
    # between them, so every member must join token 10 (the earlier target).
    n = 40
    x = torch.randn(n, 24, device=DEVICE)
    keys = torch.randn(n, 16, device=DEVICE)
    keys[30] = keys[10]
    members = [t for t in range(n) if t % 10]
    keys[members] = keys[10] * torch.rand(len(members), 1, device=DEVICE).add(0.5)
    keep = torch.zeros(n, dtype=torch.bool, device=DEVICE)
    x_out, keep_out = run_and_check(x, keys, keep, cu_of([n]), 0.1, backend)
    assert keep_out.nonzero().flatten().tolist() == [0, 10, 20, 30]
    expected = x[10] + x[members].mean(dim=0)
    torch.testing.assert_close(x_out[10], expected, rtol=1e-6, atol=1e-6)
    for unchanged in (0, 20, 30):
        assert torch.equal(x_out[unchanged], x[unchanged])


@pytest.mark.parametrize("backend", BACKENDS)
def test_identical_and_zero_keys_join_the_first_target(backend):
    # All keys equal (a flat region) or all zero (normalised to 0, every similarity exactly 0): ties
    # everywhere, so the first target of each slice takes every member.
    lengths = [30, 25]
    x = torch.randn(sum(lengths), 8, device=DEVICE)
    keys = torch.cat([torch.ones(30, 12) * 0.7, torch.zeros(25, 12)]).to(DEVICE)
    keep = torch.zeros(sum(lengths), dtype=torch.bool, device=DEVICE)
    cu = cu_of(lengths)
    x_out, keep_out = run_and_check(x, keys, keep, cu, 0.1, backend)
    for first, others in ((0, [10, 20]), (30, [42])):
        assert bool(keep_out[first]) and all(bool(keep_out[t]) for t in others)
        for t in others:
            assert torch.equal(x_out[t], x[t])
    members = [t for t in range(30) if t not in (0, 10, 20)]
    torch.testing.assert_close(x_out[0], x[0] + x[members].mean(dim=0), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    lengths = [50, 1, 29]
    n, feat_dim, key_dim = sum(lengths), 24, 16
    cu = cu_of(lengths)
    fused = torch.randn(n, 3 * key_dim, device=DEVICE)  # keys as the k block of a fused qkv projection
    wide = torch.randn(n, 2 * feat_dim, device=DEVICE)
    column_major = torch.randn(feat_dim, n, device=DEVICE).T
    keep_buffer = torch.rand(2 * n, device=DEVICE) < 0.3
    keys, keep = fused[:, key_dim : 2 * key_dim], keep_buffer[::2]
    for name, x in {"strided columns": wide[:, ::2], "column-major": column_major}.items():
        assert not x.is_contiguous() and not keys.is_contiguous() and not keep.is_contiguous()
        x_out, keep_out = run_and_check(x, keys, keep, cu, 0.1, backend)
        dense = merge_tokens(x.contiguous(), keys.contiguous(), keep.contiguous(), cu_seqlens=cu, context_frac=0.1,
                             backend=backend)  # fmt: skip
        assert torch.equal(x_out, dense[0]), name
        assert torch.equal(keep_out, dense[1]), name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_two_runs_are_bitwise_equal(backend, dtype):
    lengths = [64, 3, 45]
    x, keys, keep = random_inputs(sum(lengths), 48, 32, dtype)
    cu = cu_of(lengths)
    first = merge_tokens(x, keys, keep, cu_seqlens=cu, context_frac=0.1, backend=backend)
    second = merge_tokens(x, keys, keep, cu_seqlens=cu, context_frac=0.1, backend=backend)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_backends_agree_with_each_other():
    lengths = [70, 2, 41]
    x, keys, keep = random_inputs(sum(lengths), 40, 24, torch.float32)
    cu = cu_of(lengths)
    results = {b: merge_tokens(x, keys, keep, cu_seqlens=cu, context_frac=0.1, backend=b) for b in BACKENDS}
    for backend, (x_out, keep_out) in results.items():
        assert torch.equal(keep_out, results["torch"][1]), backend
        torch.testing.assert_close(x_out, results["torch"][0], rtol=1e-6, atol=1e-6, msg=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_default_segment_and_edge_sizes(backend):
    x, keys, keep = random_inputs(33, 10, 6, torch.float32)
    assert all(
        torch.equal(a, b)
        for a, b in zip(
            merge_tokens(x, keys, keep, backend=backend),
            merge_tokens(x, keys, keep, cu_seqlens=cu_of([33]), backend=backend),
            strict=True,
        )
    )
    for n, feat_dim in ((0, 4), (5, 0)):
        x, keys, keep = random_inputs(n, feat_dim, 3, torch.float32)
        x_out, keep_out = merge_tokens(x, keys, keep, backend=backend)
        assert x_out.shape == (n, feat_dim) and keep_out.shape == (n,)
        assert_matches_reference(x, keys, keep, cu_of([n]), 0.05, x_out, keep_out)


# ------------------------------------------------------------------ num_targets (fixed token budget)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("structure", list(STRUCTURES))
@pytest.mark.parametrize("targets_dtype", [torch.int32, torch.int64], ids=str)
def test_num_targets_match_reference(backend, dtype, structure, targets_dtype):
    lengths = STRUCTURES[structure]
    x, keys, keep = random_inputs(sum(lengths), 40, 24, dtype)
    # 0 (no merge), 1, a few, n (every unkept token a target) and far above n, cycled over the segments.
    pattern = [0, 1, 3, None, 10**6, 2]
    counts = [n if c is None else c for c, n in zip(itertools.cycle(pattern), lengths)]
    num_targets = torch.tensor(counts, dtype=targets_dtype, device=DEVICE)
    x_out, keep_out = run_and_check(x, keys, keep, cu_of(lengths), 0.05, backend, num_targets)
    for (start, end), c in zip(reference.segments(cu_of(lengths, "cpu")), counts):
        if c == 0:  # passes through untouched
            assert torch.equal(x_out[start:end].cpu(), x[start:end].cpu())
            assert torch.equal(keep_out[start:end].cpu(), keep[start:end].cpu())


@pytest.mark.parametrize("backend", BACKENDS)
def test_num_targets_equal_to_the_context_rule_changes_nothing(backend):
    lengths = [60, 1, 35, 0, 12]
    x, keys, keep = random_inputs(sum(lengths), 16, 8, torch.float32)
    cu = cu_of(lengths)
    rule = torch.tensor([max(int(0.1 * n), 1) for n in lengths], device=DEVICE)
    by_rule = merge_tokens(x, keys, keep, cu_seqlens=cu, context_frac=0.1, backend=backend)
    # context_frac is ignored once num_targets is given.
    given = merge_tokens(x, keys, keep, cu_seqlens=cu, context_frac=0.9, num_targets=rule, backend=backend)
    assert torch.equal(by_rule[0], given[0]) and torch.equal(by_rule[1], given[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_num_targets_budget_layout(backend):
    # The budget's use: b tokens per slice, c = min(b - 1, ...) targets and b - c kept by DINS; here
    # 40 tokens, 5 kept, 3 targets from the 35 unkept at stride 11: tokens 5, 16, 27 (first 5 kept).
    n = 40
    x, keys, _ = random_inputs(n, 12, 6, torch.float32)
    keep = torch.zeros(n, dtype=torch.bool, device=DEVICE)
    keep[:5] = True
    x_out, keep_out = run_and_check(x, keys, keep, cu_of([n]), 0.05, backend, torch.tensor([3], device=DEVICE))
    assert keep_out.nonzero().flatten().cpu().tolist() == [0, 1, 2, 3, 4, 5, 16, 27]
    all_zero = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    x_out, keep_out = merge_tokens(x, keys, keep, num_targets=all_zero, backend=backend)
    assert torch.equal(x_out, x) and torch.equal(keep_out, keep)


def test_num_targets_bad_input():
    x, keys, keep = _inputs()
    cu = torch.tensor([0, 3, 8], dtype=I32)
    cases = [
        (ValueError, "num_targets", dict(cu_seqlens=cu, num_targets=torch.tensor([1, -1]))),
        (ValueError, "num_targets", dict(num_targets=torch.tensor([-3]))),
        (TypeError, "num_targets", dict(num_targets=[1])),
        (TypeError, "num_targets", dict(num_targets=torch.tensor([1.0]))),
        (ValueError, "num_targets", dict(cu_seqlens=cu, num_targets=torch.tensor([1]))),
        (ValueError, "num_targets", dict(num_targets=torch.tensor(1))),
    ]
    for backend in BACKENDS:
        for error, match, kwargs in cases:
            with pytest.raises(error, match=match):
                merge_tokens(x, keys, keep, backend=backend, **kwargs)


# -------------------------------------------------------------------------------- int64 addressing
HUGE_ROW_STRIDE = 2**22  # elements between rows: 600 rows reach 2.5e9 > 2**31


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_offsets_past_int32(backend, dtype):
    """x and keys as row views of one huge storage (the k block of a fused qkv): element offsets pass
    2**31, which int32 offset arithmetic wraps (a segfault on the Triton path before int64 addressing).
    torch.empty commits only the pages the views touch."""
    lengths = [150, 1, 149, 300]
    n, feat_dim, key_dim = sum(lengths), 24, 16
    storage = torch.empty(n * HUGE_ROW_STRIDE, dtype=dtype, device=DEVICE)
    x = storage.as_strided((n, feat_dim), (HUGE_ROW_STRIDE, 1))
    keys = storage.as_strided((n, key_dim), (HUGE_ROW_STRIDE, 1), feat_dim)
    dense_x, dense_keys, keep = random_inputs(n, feat_dim, key_dim, dtype)
    x.copy_(dense_x)
    keys.copy_(dense_keys)
    assert (n - 1) * x.stride(0) > 2**31
    cu = cu_of(lengths)
    for num_targets in (None, torch.tensor([3, 0, 149, 5], device=DEVICE)):
        x_out, keep_out = run_and_check(x, keys, keep, cu, 0.05, backend, num_targets)
        dense = merge_tokens(dense_x, dense_keys, keep, cu_seqlens=cu, num_targets=num_targets, backend=backend)
        assert torch.equal(x_out, dense[0]) and torch.equal(keep_out, dense[1])


# ------------------------------------------------------------------------------------- properties
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lengths=st.lists(st.integers(0, 40), min_size=1, max_size=4),
    feat_dim=st.integers(1, 20),
    key_dim=st.integers(1, 20),
    keep_fraction=st.sampled_from([0.0, 0.2, 0.6, 1.0]),
    context_frac=st.sampled_from([0.0, 0.05, 0.2, 0.5, 2.0]),
    dtype=st.sampled_from(DTYPES),
    given_targets=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_all_backends_match_reference(
    lengths, feat_dim, key_dim, keep_fraction, context_frac, dtype, given_targets, seed
):
    torch.manual_seed(seed)
    x, keys, keep = random_inputs(sum(lengths), feat_dim, key_dim, dtype, keep_fraction)
    cu = cu_of(lengths)
    num_targets = torch.randint(0, 8, (len(lengths),), device=DEVICE) if given_targets else None
    assume(merge_plan(keys, keep, cu, context_frac, num_targets)[2] > DECISION_GAP)
    for backend in BACKENDS:
        run_and_check(x, keys, keep, cu, context_frac, backend, num_targets)


# ----------------------------------------------------------------------------------- bad input
def _inputs(n=8, d=4, dk=3):
    return torch.randn(n, d), torch.randn(n, dk), torch.zeros(n, dtype=torch.bool)


def _with_nan(index):
    args = list(_inputs())
    args[index] = args[index].clone()
    args[index][2, 1] = float("nan") if index == 0 else float("inf")
    return args


I32 = torch.int32


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: merge_tokens(torch.randn(8), *_inputs()[1:]), ValueError, "x must be"),
        (lambda: merge_tokens(torch.randn(2, 8, 4), *_inputs()[1:]), ValueError, "x must be"),
        (lambda: merge_tokens(_inputs()[0], torch.randn(9, 3), _inputs()[2]), ValueError, "keys must be"),
        (lambda: merge_tokens(_inputs()[0], torch.randn(8), _inputs()[2]), ValueError, "keys must be"),
        (lambda: merge_tokens(_inputs()[0], torch.randn(8, 0), _inputs()[2]), ValueError, "keys needs"),
        (lambda: merge_tokens(*_inputs()[:2], torch.zeros(7, dtype=torch.bool)), ValueError, "keep must be"),
        (lambda: merge_tokens(*_inputs()[:2], torch.zeros(8, 1, dtype=torch.bool)), ValueError, "keep must be"),
        (lambda: merge_tokens(*_inputs()[:2], torch.zeros(8)), TypeError, "keep has unsupported dtype"),
        (lambda: merge_tokens(_inputs()[0].double(), *_inputs()[1:]), TypeError, "x has unsupported dtype"),
        (lambda: merge_tokens(_inputs()[0].int(), *_inputs()[1:]), TypeError, "x has unsupported dtype"),
        (lambda: merge_tokens(_inputs()[0], _inputs()[1].int(), _inputs()[2]), TypeError, "keys has unsupported"),
        (lambda: merge_tokens([[1.0]], *_inputs()[1:]), TypeError, "x must be a torch.Tensor"),
        (lambda: merge_tokens(*_with_nan(0)), ValueError, "x contains NaN"),
        (lambda: merge_tokens(*_with_nan(1)), ValueError, "keys contains NaN or Inf"),
        (lambda: merge_tokens(*_inputs(), context_frac=-0.1), ValueError, "context_frac"),
        (lambda: merge_tokens(*_inputs(), context_frac=float("nan")), ValueError, "context_frac"),
        (lambda: merge_tokens(*_inputs(), context_frac=float("inf")), ValueError, "context_frac"),
        (lambda: merge_tokens(*_inputs(), context_frac="0.05"), TypeError, "context_frac"),
        (lambda: merge_tokens(*_inputs(), context_frac=True), TypeError, "context_frac"),
        (lambda: merge_tokens(*_inputs(), cu_seqlens=torch.tensor([0, 7], dtype=I32)), ValueError, "cu_seqlens"),
        (lambda: merge_tokens(*_inputs(), cu_seqlens=torch.tensor([2, 8], dtype=I32)), ValueError, "cu_seqlens"),
        (lambda: merge_tokens(*_inputs(), cu_seqlens=torch.tensor([0, 6, 4, 8], dtype=I32)), ValueError, "cu_seqlens"),
        (lambda: merge_tokens(*_inputs(), cu_seqlens=torch.tensor([8], dtype=I32)), ValueError, "cu_seqlens"),
        (lambda: merge_tokens(*_inputs(), cu_seqlens=torch.tensor([0.0, 8.0])), TypeError, "cu_seqlens"),
        (lambda: merge_tokens(*_inputs(), backend="gpu"), ValueError, "backend"),
    ],
)  # fmt: skip
def test_bad_input_is_rejected_with_the_argument_named(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_unavailable_explicit_backend_raises(monkeypatch):
    from medpruner_kernels import _dispatch

    monkeypatch.setattr(_dispatch, "CPP_AVAILABLE", False)
    with pytest.raises(RuntimeError, match="compiled extension"):
        merge_tokens(*_inputs(), backend="cpp")


# ------------------------------------------------------------------------- torch.library plumbing
def _op_args(device=DEVICE):
    x, keys, keep = random_inputs(40, 12, 8, torch.float32)
    args = (x.to(device), keys.to(device), keep.to(device), cu_of([25, 1, 14], device), 0.1)
    return [(*args, None), (*args, torch.tensor([3, 0, 14], device=device))]


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    """One registered op whose last argument names the backend; every backend passes every utility,
    with the context_frac rule and with per-segment target counts."""
    for args in _op_args():
        torch.library.opcheck(torch.ops.medpruner.merge_tokens, (*args, backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    lengths = [30, 1, 19]
    x, keys, keep = random_inputs(sum(lengths), 16, 8, torch.float32)
    cu = cu_of(lengths)

    def merge(x, keys, keep):
        return merge_tokens(x, keys, keep, cu_seqlens=cu, context_frac=0.1, backend=backend)

    compiled = torch.compile(merge, fullgraph=True, backend="eager" if DEVICE.type == "cpu" else "inductor")
    for got, want in zip(compiled(x, keys, keep), merge(x, keys, keep), strict=True):
        assert torch.equal(got, want)


@pytest.mark.skipif("cpp" not in BACKENDS, reason="needs the compiled extension")
def test_cpp_result_does_not_depend_on_the_thread_count():
    lengths = [90, 3, 61]
    x, keys, keep = random_inputs(sum(lengths), 40, 24, torch.float32)
    cu = cu_of(lengths)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = merge_tokens(x, keys, keep, cu_seqlens=cu, context_frac=0.1, backend="cpp")
    finally:
        torch.set_num_threads(threads)
    many = merge_tokens(x, keys, keep, cu_seqlens=cu, context_frac=0.1, backend="cpp")
    assert torch.equal(single[0], many[0]) and torch.equal(single[1], many[1])
