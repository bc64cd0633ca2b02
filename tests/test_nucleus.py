"""nucleus_select / nucleus_indices against the float64 reference, on every backend here."""

from pathlib import Path

import pytest
import torch
from conftest import DEVICE, available_backends
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medpruner_kernels import nucleus as nucleus_module
from medpruner_kernels import nucleus_indices, nucleus_select, raise_pending_errors, reference

# The C++ kernel is CPU-only: on a GPU machine the cpp backend is not one of this op's CUDA paths.
BACKENDS = [
    b for b in available_backends(cpp_ops=nucleus_module.CPP_OPS) if b != "cpp" or DEVICE.type == "cpu"
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# The Triton and torch paths sum the masses in fp32: a slice may differ from the float64 reference only
# where a prefix sum is within this of tau, or where two distinct masses at the cut are this close.
DECISION_TOL = 1e-5


# ------------------------------------------------------------------------------------------ helpers
def _flat(scores, tau, cu_seqlens):
    """(flat scores, offsets, per-slice tau) on CPU, the reference's inputs."""
    if cu_seqlens is None:
        slices, tokens = scores.shape
        flat = scores.reshape(-1)
        cu = torch.arange(slices + 1, dtype=torch.int64) * tokens
    else:
        flat, cu = scores, cu_seqlens.cpu().to(torch.int64)
        slices = cu.numel() - 1
    taus = tau.cpu().double().expand(slices) if isinstance(tau, torch.Tensor) else torch.full((slices,), tau)
    return flat.cpu(), cu, taus.to(torch.float64)


def _clamp(count, n, min_keep, max_keep):
    upper = n if max_keep is None else min(max_keep, n)
    return max(min(max(count, min_keep), upper), 0)


def _decisions(scores, tau, *, temperature=None, cu_seqlens=None, min_keep=1, max_keep=None):
    """Per slice (ambiguous, lowest count, highest count) that fp32 rounding can legitimately give.

    With the masses p sorted descending (float64) and cum their prefix sums, a kernel whose prefix sums
    are within DECISION_TOL of cum counts anywhere from 1 + #(cum < tau - tol) to 1 + #(cum < tau + tol);
    the slice is ambiguous when those two counts clamp differently. It is also ambiguous when the masses
    on both sides of the cut differ, but by less than DECISION_TOL relative (fp32 may order them either
    way). Exact ties are never ambiguous: every backend must break them towards the lower index."""
    flat, cu, taus = _flat(scores, tau, cu_seqlens)
    decisions = []
    for b, (start, end) in enumerate(reference.segments(cu)):
        n, t = end - start, float(taus[b])
        p = reference.nucleus_probabilities(flat[start:end], temperature)
        if n == 0 or t >= 1.0 or float(p.sum()) == 0.0:
            count = reference.nucleus_count(p, t, min_keep, max_keep)
            decisions.append((False, count, count))
            continue
        ordered = torch.sort(p, descending=True, stable=True).values
        cum = torch.cumsum(ordered, dim=0)
        low = _clamp(min(int((cum < t - DECISION_TOL).sum()) + 1, n), n, min_keep, max_keep)
        high = _clamp(min(int((cum < t + DECISION_TOL).sum()) + 1, n), n, min_keep, max_keep)
        ambiguous = low != high
        if not ambiguous and 0 < low < n:
            gap = float(ordered[low - 1] - ordered[low])
            ambiguous = 0.0 < gap <= DECISION_TOL * float(ordered[low - 1])
        decisions.append((ambiguous, low, high))
    return decisions


def ambiguous_slices(scores, tau, **kwargs):
    return torch.tensor([d[0] for d in _decisions(scores, tau, **kwargs)], dtype=torch.bool)


def reference_keep(scores, tau, *, temperature=None, cu_seqlens=None, min_keep=1, max_keep=None):
    flat, cu, taus = _flat(scores, tau, cu_seqlens)
    keep = reference.nucleus_select(
        flat, taus, cu, temperature=temperature, min_keep=min_keep, max_keep=max_keep
    )
    return keep.reshape(scores.shape)


def assert_matches_reference(keep, scores, tau, *, max_ambiguous=0.2, **kwargs):
    """Exact agreement outside ambiguous slices. Inside them the kept set must still be the top masses
    (up to near-ties) with a count in the range rounding allows."""
    assert keep.dtype == torch.bool and keep.shape == scores.shape
    expected = reference_keep(scores, tau, **kwargs).reshape(-1)
    decisions = _decisions(scores, tau, **kwargs)
    flat, cu, _ = _flat(scores, tau, kwargs.get("cu_seqlens"))
    keep = keep.cpu().reshape(-1)
    for b, (start, end) in enumerate(reference.segments(cu)):
        got, want = keep[start:end], expected[start:end]
        ambiguous, low, high = decisions[b]
        if not ambiguous:
            assert torch.equal(got, want), (
                f"slice {b}: kept {got.nonzero().flatten().tolist()}, "
                f"reference {want.nonzero().flatten().tolist()}"
            )
            continue
        assert low <= int(got.sum()) <= high, f"slice {b}: kept {int(got.sum())}, allowed [{low}, {high}]"
        p = reference.nucleus_probabilities(flat[start:end], kwargs.get("temperature"))
        if bool(got.any()) and not bool(got.all()):
            assert float(p[got].min()) >= float(p[~got].max()) * (1 - DECISION_TOL), f"slice {b}: not the top"
    # Random inputs are rarely ambiguous; many excused slices would point at a broken helper.
    assert sum(d[0] for d in decisions) <= max(1, max_ambiguous * len(decisions))


def _scores(shape, dtype, temperature, kind="random"):
    if kind == "random":
        x = torch.randn(shape, dtype=torch.float64) * 2 if temperature is not None else torch.rand(shape) ** 4
    elif kind == "peaked":
        x = torch.rand(shape, dtype=torch.float64) * 0.01
        x[..., 0] = 50.0 if temperature is not None else 100.0
    elif kind == "uniform":
        x = torch.full(shape, 0.25, dtype=torch.float64)
    return x.to(dtype).to(DEVICE)


def _check_value_error(fn, match):
    """A value error is raised at once on CPU and at the sync point on CUDA."""
    with pytest.raises(ValueError, match=match):
        fn()
        raise_pending_errors()
    raise_pending_errors()


def _ids(value):
    return str(value).replace("torch.", "")


# ---------------------------------------------------------------------------------- correctness
SHAPES = [(1, 1), (1, 7), (3, 64), (17, 100), (250, 33), (2, 1000)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("temperature", [None, 1.0, 2.0])
def test_dense_matches_reference(backend, dtype, shape, temperature):
    scores = _scores(shape, dtype, temperature)
    keep = nucleus_select(scores, 0.9, temperature=temperature, backend=backend)
    assert keep.device == scores.device
    assert_matches_reference(keep, scores, 0.9, temperature=temperature)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tokens", [4096, 3000])
def test_long_slices(backend, tokens):
    scores = _scores((2, tokens), torch.float32, 1.0)
    keep = nucleus_select(scores, 0.5, temperature=1.0, backend=backend)
    assert_matches_reference(keep, scores, 0.5, temperature=1.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tau", [0.01, 0.3, 0.75, 0.999, 1.0, 1.7])
@pytest.mark.parametrize("temperature", [None, 1.0])
def test_tau_values(backend, tau, temperature):
    scores = _scores((40, 50), torch.float32, temperature)
    keep = nucleus_select(scores, tau, temperature=temperature, backend=backend)
    assert_matches_reference(keep, scores, tau, temperature=temperature)
    if tau >= 1.0:
        assert bool(keep.all())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [None, 2.0])
def test_per_slice_tau(backend, temperature):
    scores = _scores((60, 45), torch.float32, temperature)
    tau = (torch.rand(60, dtype=torch.float64) * 1.2 + 0.01).to(DEVICE)
    keep = nucleus_select(scores, tau, temperature=temperature, backend=backend)
    assert_matches_reference(keep, scores, tau, temperature=temperature)
    assert bool(keep[tau >= 1].all())
    zero_d = torch.tensor(0.6, device=DEVICE, dtype=torch.float16)
    keep = nucleus_select(scores, zero_d, temperature=temperature, backend=backend)
    assert_matches_reference(keep, scores, zero_d, temperature=temperature)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("temperature", [None, 1.0, 2.0])
@pytest.mark.parametrize("cu_dtype", [torch.int32, torch.int64], ids=_ids)
def test_varlen_matches_reference(backend, dtype, temperature, cu_dtype):
    lengths = [0, 5, 0, 0, 17, 1, 64, 0, 33, 2, 0]
    cu = torch.tensor([0] + lengths, dtype=torch.int64).cumsum(0).to(cu_dtype).to(DEVICE)
    scores = _scores((sum(lengths),), dtype, temperature)
    tau = (torch.rand(len(lengths), dtype=torch.float64) * 0.9 + 0.05).to(DEVICE)
    for t in (tau, 0.8):
        keep = nucleus_select(scores, t, temperature=temperature, cu_seqlens=cu, backend=backend)
        assert_matches_reference(keep, scores, t, temperature=temperature, cu_seqlens=cu)
    keep = nucleus_select(scores, 0.8, temperature=temperature, cu_seqlens=cu, max_seqlen=64, backend=backend)
    assert_matches_reference(keep, scores, 0.8, temperature=temperature, cu_seqlens=cu)


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_equals_dense(backend):
    scores = _scores((30, 40), torch.float32, 1.0)
    cu = (torch.arange(31, dtype=torch.int32) * 40).to(DEVICE)
    dense = nucleus_select(scores, 0.7, temperature=1.0, backend=backend)
    ragged = nucleus_select(scores.reshape(-1), 0.7, temperature=1.0, cu_seqlens=cu, backend=backend)
    assert torch.equal(dense.reshape(-1), ragged)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "min_keep,max_keep", [(0, None), (0, 0), (3, None), (1, 2), (5, 5), (10, 100), (80, None)]
)
@pytest.mark.parametrize("tau", [0.2, 0.95, 1.0])
@pytest.mark.parametrize("temperature", [None, 1.0])
def test_min_max_keep(backend, min_keep, max_keep, tau, temperature):
    scores = _scores((25, 30), torch.float32, temperature)
    kwargs = dict(temperature=temperature, min_keep=min_keep, max_keep=max_keep)
    keep = nucleus_select(scores, tau, backend=backend, **kwargs)
    assert_matches_reference(keep, scores, tau, **kwargs)
    counts = keep.sum(dim=1)
    assert bool((counts >= min(min_keep, 30)).all())
    if max_keep is not None:
        assert bool((counts <= max_keep).all())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [None, 1.0, 2.0])
def test_ties_keep_lower_index(backend, temperature):
    scores = torch.tensor(
        [[0.3, 0.2, 0.3, 0.2], [0.25, 0.25, 0.25, 0.25], [0.1, 0.4, 0.1, 0.4]], dtype=torch.float32
    ).to(DEVICE)
    keep = nucleus_select(scores, 0.55, temperature=temperature, backend=backend)
    assert_matches_reference(keep, scores, 0.55, temperature=temperature)
    if temperature is None:
        expected = [[True, False, True, False], [True, True, True, False], [False, True, False, True]]
        assert keep.cpu().tolist() == expected
    flat = torch.ones(5, 12, device=DEVICE)
    keep = nucleus_select(flat, 0.35, temperature=temperature, backend=backend)
    assert keep.cpu().tolist() == [[True] * 5 + [False] * 7] * 5


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_zero_slices(backend):
    scores = torch.rand(6, 20, device=DEVICE)
    scores[1] = 0
    scores[4] = 0
    for min_keep, kept in [(1, 1), (3, 3), (0, 0), (50, 20)]:
        keep = nucleus_select(scores, 0.5, min_keep=min_keep, backend=backend)
        assert_matches_reference(keep, scores, 0.5, min_keep=min_keep)
        for row in (1, 4):
            assert keep[row].cpu().tolist() == [True] * kept + [False] * (20 - kept)
    assert bool(nucleus_select(scores, 1.0, backend=backend).all())
    keep = nucleus_select(scores, 1.0, max_keep=4, backend=backend)
    assert keep[1].cpu().tolist() == [True] * 4 + [False] * 16
    # -0.0 is a valid zero mass: it must not sort below the +0.0 masses.
    signed = torch.tensor([[-0.0, 0.0, 1.0, -0.0, 0.0]], device=DEVICE)
    keep = nucleus_select(signed, 0.999, min_keep=3, backend=backend)
    assert keep.cpu().tolist() == [[True, True, True, False, False]]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["peaked", "uniform"])
@pytest.mark.parametrize("temperature", [None, 1.0])
def test_peaked_and_uniform(backend, kind, temperature):
    scores = _scores((8, 101), torch.float32, temperature, kind)
    keep = nucleus_select(scores, 0.55, temperature=temperature, backend=backend)
    assert_matches_reference(keep, scores, 0.55, temperature=temperature)
    counts = keep.sum(dim=1).cpu()
    if kind == "peaked":
        assert counts.tolist() == [1] * 8 and bool(keep[:, 0].all())
    else:
        # 56 / 101 is the first prefix >= 0.55; every mass ties, so the lowest indices win.
        assert counts.tolist() == [56] * 8 and bool(keep[:, :56].all())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [None, 1.0])
def test_non_contiguous(backend, temperature):
    base = _scores((70, 40), torch.float32, temperature)
    for view in (base.t(), base[::2, ::3], base[:, 5:31]):
        keep = nucleus_select(view, 0.8, temperature=temperature, backend=backend)
        assert keep.is_contiguous()
        assert torch.equal(
            keep, nucleus_select(view.contiguous(), 0.8, temperature=temperature, backend=backend)
        )
        assert_matches_reference(keep, view, 0.8, temperature=temperature)
    strided = base.reshape(-1)[::7]
    cu = torch.tensor([0, 100, 100, 250, strided.numel()], dtype=torch.int32, device=DEVICE)
    keep = nucleus_select(strided, 0.8, temperature=temperature, cu_seqlens=cu, backend=backend)
    assert_matches_reference(keep, strided, 0.8, temperature=temperature, cu_seqlens=cu)


def _mri_attention_scores():
    """Attention each 3x3 patch of a real MRI slice receives (float64 reference attention): the shape
    of the importances the DINS stage sees, per slice summing to its token count."""
    import nibabel

    path = Path(nibabel.__file__).parent / "tests" / "data" / "anatomical.nii"
    volume = torch.from_numpy(nibabel.load(str(path)).get_fdata()).to(torch.float64)
    volume = volume.permute(2, 0, 1)[:, :33, :39]  # [slices, 33, 39] -> 11 x 13 patches of 3x3
    patches = volume.unfold(1, 3, 3).unfold(2, 3, 3).reshape(volume.shape[0], -1, 9)
    features = (patches - patches.mean()) / (patches.std() + 1e-9)
    tokens = features.shape[1]
    flat = features.reshape(-1, 1, 9)
    cu = torch.arange(volume.shape[0] + 1, dtype=torch.int32) * tokens
    received = reference.attention_importance(flat, flat, cu, scale=0.5)
    return received.reshape(volume.shape[0], tokens)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [None, 1.0, 2.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_ids)
def test_structured_mri_attention(backend, temperature, dtype):
    scores = _mri_attention_scores().to(dtype).to(DEVICE)
    for tau in (0.5, 0.9):
        keep = nucleus_select(scores, tau, temperature=temperature, backend=backend)
        assert_matches_reference(keep, scores, tau, temperature=temperature)
        assert bool((keep.sum(dim=1) >= 1).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_inputs(backend):
    for shape in ((0, 5), (4, 0)):
        keep = nucleus_select(torch.rand(shape, device=DEVICE), 0.5, backend=backend)
        assert keep.shape == shape and keep.dtype == torch.bool
    cu = torch.zeros(4, dtype=torch.int32, device=DEVICE)
    keep = nucleus_select(torch.rand(0, device=DEVICE), 0.5, cu_seqlens=cu, backend=backend)
    assert keep.shape == (0,)
    indices, cu_counts = nucleus_indices(torch.rand(0, device=DEVICE), 0.5, cu_seqlens=cu, backend=backend)
    assert indices.shape == (0,) and cu_counts.cpu().tolist() == [0, 0, 0, 0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_auto_and_backends_agree(backend):
    scores = _scores((50, 64), torch.float32, 2.0)
    assert torch.equal(
        nucleus_select(scores, 0.9, temperature=2.0, backend=backend),
        nucleus_select(scores, 0.9, temperature=2.0),
    ) or bool(ambiguous_slices(scores, 0.9, temperature=2.0).any())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    slices=st.integers(1, 12),
    tokens=st.integers(1, 90),
    tau=st.floats(0.001, 1.3),
    temperature=st.one_of(st.none(), st.floats(0.25, 4.0)),
    min_keep=st.integers(0, 6),
    extra=st.one_of(st.none(), st.integers(0, 40)),
    ragged=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_random(slices, tokens, tau, temperature, min_keep, extra, ragged, seed):
    generator = torch.Generator().manual_seed(seed)
    max_keep = None if extra is None else min_keep + extra
    kwargs = dict(temperature=temperature, min_keep=min_keep, max_keep=max_keep)
    if ragged:
        lengths = torch.randint(0, tokens + 1, (slices,), generator=generator)
        cu = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]).to(torch.int32).to(DEVICE)
        kwargs["cu_seqlens"] = cu
        shape = (int(lengths.sum()),)
    else:
        shape = (slices, tokens)
    raw = torch.randn(shape, generator=generator, dtype=torch.float64) * 3
    scores = (raw if temperature is not None else raw.abs() ** 3).to(torch.float32).to(DEVICE)
    for backend in BACKENDS:
        keep = nucleus_select(scores, tau, backend=backend, **kwargs)
        # Hypothesis seeks out taus within rounding of a prefix sum (e.g. 0.99999): every slice may be
        # ambiguous, and each is still checked for a count in the allowed range and the top masses.
        assert_matches_reference(keep, scores, tau, max_ambiguous=1.0, **kwargs)


# ------------------------------------------------------------------------ fixed counts (token budget)
def reference_counts_keep(scores, counts, *, temperature=None, cu_seqlens=None):
    flat, cu, taus = _flat(scores, 0.9, cu_seqlens)
    keep = reference.nucleus_select(flat, taus, cu, temperature=temperature, counts=counts.cpu())
    return keep.reshape(scores.shape)


def _random_counts(lengths, generator=None):
    """One count per slice in [0, n], with 0 and n both present whenever there are two slices."""
    counts = [int(torch.randint(0, n + 1, (), generator=generator)) for n in lengths]
    if len(counts) >= 2:
        counts[0], counts[-1] = 0, lengths[-1]
    return counts


def _counts_scores(shape, dtype, temperature, kind):
    if kind == "ties":
        # Few distinct values: most tokens tie with others, so the lower-index rule decides.
        raw = torch.randint(0, 4, shape).to(torch.float64) * (1.0 if temperature is not None else 0.25)
        return raw.to(dtype).to(DEVICE)
    return _scores(shape, dtype, temperature, kind)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("temperature", [None, 2.0])
@pytest.mark.parametrize("kind", ["random", "peaked", "ties"])
def test_counts_dense_match_reference(backend, dtype, temperature, kind):
    scores = _counts_scores((23, 41), dtype, temperature, kind)
    counts = torch.tensor(_random_counts([41] * 23), device=DEVICE)
    # tau, min_keep and max_keep play no part in a fixed count.
    keep = nucleus_select(
        scores, 0.05, temperature=temperature, counts=counts, min_keep=7, max_keep=9, backend=backend
    )
    assert keep.dtype == torch.bool and keep.device == scores.device
    assert torch.equal(keep.cpu(), reference_counts_keep(scores, counts, temperature=temperature))
    assert keep.sum(dim=1).cpu().tolist() == counts.cpu().tolist()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("temperature", [None, 1.0])
@pytest.mark.parametrize("counts_dtype", [torch.int32, torch.int64], ids=_ids)
def test_counts_varlen_match_reference(backend, dtype, temperature, counts_dtype):
    lengths = [0, 5, 0, 17, 1, 64, 33, 2, 0]
    cu = torch.tensor([0] + lengths, dtype=torch.int64).cumsum(0).to(torch.int32).to(DEVICE)
    scores = _counts_scores((sum(lengths),), dtype, temperature, "random")
    counts = torch.tensor(_random_counts(lengths), dtype=counts_dtype, device=DEVICE)
    for max_seqlen in (None, 64):
        keep = nucleus_select(
            scores, 0.9, temperature=temperature, cu_seqlens=cu, max_seqlen=max_seqlen, counts=counts,
            backend=backend,
        )  # fmt: skip
        expected = reference_counts_keep(scores, counts, temperature=temperature, cu_seqlens=cu)
        assert torch.equal(keep.cpu(), expected)
    indices, cu_counts = nucleus_indices(
        scores, 0.9, temperature=temperature, cu_seqlens=cu, counts=counts, backend=backend
    )
    assert (cu_counts[1:] - cu_counts[:-1]).cpu().tolist() == counts.cpu().tolist()
    total = int(cu_counts[-1])
    assert torch.equal(indices[:total].cpu(), expected.nonzero().flatten())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [None, 1.0])
def test_counts_zero_and_all(backend, temperature):
    scores = _scores((6, 30), torch.float32, temperature)
    for value, kept in ((0, [False] * 30), (30, [True] * 30)):
        counts = torch.full((6,), value, dtype=torch.int64, device=DEVICE)
        # Even tau >= 1 (keep all) and min_keep above the count do not move a fixed count.
        keep = nucleus_select(scores, 1.0, temperature=temperature, counts=counts, min_keep=5, backend=backend)
        assert keep.cpu().tolist() == [kept] * 6
    empty = nucleus_select(
        torch.rand(0, device=DEVICE), 0.5, cu_seqlens=torch.zeros(3, dtype=torch.int32, device=DEVICE),
        counts=torch.zeros(2, dtype=torch.int32, device=DEVICE), backend=backend,
    )  # fmt: skip
    assert empty.shape == (0,)


@pytest.mark.parametrize("backend", BACKENDS)
def test_counts_ties_and_exact_order(backend):
    # Equal scores (and -0.0 == +0.0) tie: the lower index wins.
    signed = torch.tensor([[0.0, -0.0, 2.0, 0.0, -0.0, 1.0]], device=DEVICE)
    keep = nucleus_select(signed, 0.9, counts=torch.tensor([4], device=DEVICE), backend=backend)
    assert keep.cpu().tolist() == [[True, True, True, False, False, True]]
    flat = torch.ones(3, 10, device=DEVICE)
    keep = nucleus_select(flat, 0.9, temperature=1.0, counts=torch.tensor([0, 4, 10], device=DEVICE),
                          backend=backend)  # fmt: skip
    assert keep.sum(dim=1).cpu().tolist() == [0, 4, 10] and bool(keep[1, :4].all())
    # An attention sink 1000 above the rest: every other softmax mass underflows to 0.0 even in
    # float64, yet the exact masses still order like the scores, and the kernels must rank them so.
    scores = torch.tensor([[0.3, 0.1, 1000.0, 0.7, 0.5, 0.2, 0.9]], dtype=torch.float64)
    assert bool((torch.softmax(scores, dim=1)[0, [0, 1, 3, 4, 5, 6]] == 0).all())
    for dtype in DTYPES:
        keep = nucleus_select(scores.to(dtype).to(DEVICE), 0.9, temperature=1.0,
                              counts=torch.tensor([4], device=DEVICE), backend=backend)  # fmt: skip
        assert keep.cpu().nonzero()[:, 1].tolist() == [2, 3, 4, 6], dtype
    # float64 scores closer than float32 can tell apart keep their float64 order.
    close = torch.tensor([[1.0, 1.0 + 2.0**-40, 1.0 + 2.0**-41, 0.5]], dtype=torch.float64, device=DEVICE)
    keep = nucleus_select(close, 0.9, temperature=1.0, counts=torch.tensor([1], device=DEVICE), backend=backend)
    assert keep.cpu().tolist() == [[False, True, False, False]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_counts_long_and_strided(backend):
    base = _scores((3, 2 * 1500), torch.float32, 1.0)
    view = base[:, ::2]
    counts = torch.tensor([1, 700, 1500], device=DEVICE)
    keep = nucleus_select(view, 0.9, temperature=1.0, counts=counts, backend=backend)
    assert torch.equal(keep.cpu(), reference_counts_keep(view, counts, temperature=1.0))
    assert keep.sum(dim=1).cpu().tolist() == [1, 700, 1500]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    slices=st.integers(1, 10),
    tokens=st.integers(1, 70),
    temperature=st.one_of(st.none(), st.floats(0.25, 4.0)),
    distinct=st.integers(1, 50),
    ragged=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_counts_property_random(slices, tokens, temperature, distinct, ragged, seed):
    generator = torch.Generator().manual_seed(seed)
    if ragged:
        lengths = torch.randint(0, tokens + 1, (slices,), generator=generator).tolist()
        cu = torch.tensor([0, *lengths]).cumsum(0).to(torch.int32).to(DEVICE)
        shape = (sum(lengths),)
    else:
        lengths, cu, shape = [tokens] * slices, None, (slices, tokens)
    # `distinct` values only: small numbers force many ties.
    raw = torch.randint(0, distinct, shape, generator=generator).to(torch.float64) / distinct
    scores = (raw * 6 - 3 if temperature is not None else raw).to(torch.float32).to(DEVICE)
    counts = torch.tensor(_random_counts(lengths, generator), dtype=torch.int64, device=DEVICE)
    expected = reference_counts_keep(scores, counts, temperature=temperature, cu_seqlens=cu)
    for backend in BACKENDS:
        keep = nucleus_select(scores, 0.5, temperature=temperature, cu_seqlens=cu, counts=counts, backend=backend)
        assert torch.equal(keep.cpu(), expected), backend


@pytest.mark.parametrize("backend", BACKENDS)
def test_counts_invalid_values(backend):
    scores = torch.rand(4, 9, device=DEVICE)
    for counts in ([0, 3, 10, 1], [0, -1, 2, 2]):
        _check_value_error(
            lambda c=counts: nucleus_select(scores, 0.9, counts=torch.tensor(c, device=DEVICE), backend=backend),
            "counts",
        )
    flat = scores.reshape(-1)
    cu = torch.tensor([0, 10, 10, 36], dtype=torch.int32, device=DEVICE)
    _check_value_error(
        lambda: nucleus_select(flat, 0.9, cu_seqlens=cu, counts=torch.tensor([10, 1, 5], device=DEVICE),
                               backend=backend),
        "counts",
    )  # fmt: skip
    ok = torch.tensor([2, 0, 26], device=DEVICE)
    assert nucleus_select(flat, 0.9, cu_seqlens=cu, counts=ok, backend=backend).sum().item() == 28
    # The score checks still apply under a fixed count.
    bad = scores.clone()
    bad[1, 1] = float("nan")
    counts = torch.ones(4, dtype=torch.int64, device=DEVICE)
    _check_value_error(lambda: nucleus_select(bad, 0.9, temperature=1.0, counts=counts, backend=backend), "scores")
    bad[1, 1] = -0.5
    _check_value_error(lambda: nucleus_select(bad, 0.9, counts=counts, backend=backend), "non-negative")


# -------------------------------------------------------------------------------- int64 addressing
HUGE_ROW_STRIDE = 2**22  # elements between rows (or tokens): 600 of them reach 2.5e9 > 2**31


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fixed", [False, True], ids=["tau", "counts"])
def test_offsets_past_int32(backend, fixed):
    """Scores as views of one huge storage whose element offsets pass 2**31 (int32 offsets would
    wrap): rows 2**22 elements apart, and a ragged batch whose tokens are. torch.empty commits only
    the pages the views touch."""
    slices, tokens = 600, 16
    storage = torch.empty(slices * HUGE_ROW_STRIDE, dtype=torch.float32, device=DEVICE)
    dense = _scores((slices, tokens), torch.float32, 1.0)
    rows = storage.as_strided((slices, tokens), (HUGE_ROW_STRIDE, 1))
    rows.copy_(dense)
    assert (slices - 1) * rows.stride(0) > 2**31
    counts = torch.randint(0, tokens + 1, (slices,), device=DEVICE) if fixed else None
    keep = nucleus_select(rows, 0.7, temperature=1.0, counts=counts, backend=backend)
    assert torch.equal(keep, nucleus_select(dense, 0.7, temperature=1.0, counts=counts, backend=backend))
    if fixed:
        assert torch.equal(keep.cpu(), reference_counts_keep(dense, counts, temperature=1.0))
    else:
        assert_matches_reference(keep, dense, 0.7, temperature=1.0)
    flat = storage.as_strided((slices,), (HUGE_ROW_STRIDE,))
    cu = torch.tensor([0, 100, 100, 350, slices], dtype=torch.int32, device=DEVICE)
    counts = torch.tensor([40, 0, 250, 3], device=DEVICE) if fixed else None
    keep = nucleus_select(flat, 0.7, temperature=1.0, cu_seqlens=cu, counts=counts, backend=backend)
    contiguous = flat.contiguous()
    assert torch.equal(
        keep, nucleus_select(contiguous, 0.7, temperature=1.0, cu_seqlens=cu, counts=counts, backend=backend)
    )
    if fixed:
        assert torch.equal(keep.cpu(), reference_counts_keep(contiguous, counts, temperature=1.0, cu_seqlens=cu))
    else:
        assert_matches_reference(keep, contiguous, 0.7, temperature=1.0, cu_seqlens=cu)


# ------------------------------------------------------------------------------ nucleus_indices
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ragged", [False, True])
def test_indices_match_mask(backend, ragged):
    if ragged:
        cu = torch.tensor([0, 10, 10, 45, 46, 80], dtype=torch.int32, device=DEVICE)
        scores, slices = _scores((80,), torch.float32, 1.0), 5
    else:
        cu, scores, slices = None, _scores((20, 16), torch.float32, 1.0), 20
    keep = nucleus_select(scores, 0.6, temperature=1.0, cu_seqlens=cu, backend=backend)
    indices, cu_counts = nucleus_indices(scores, 0.6, temperature=1.0, cu_seqlens=cu, backend=backend)
    assert indices.dtype == torch.int64 and indices.shape == (scores.numel(),)
    assert cu_counts.dtype == torch.int32 and cu_counts.shape == (slices + 1,)
    kept = keep.reshape(-1).nonzero().flatten()
    total = int(cu_counts[-1])
    assert total == kept.numel() and int(cu_counts[0]) == 0
    assert torch.equal(indices[:total], kept)
    assert bool((indices[total:] == -1).all())
    offsets = cu.to(torch.int64) if ragged else torch.arange(slices + 1, device=DEVICE) * 16
    bounds = offsets.tolist()
    per_slice = [int(keep.reshape(-1)[a:b].sum()) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    assert (cu_counts[1:] - cu_counts[:-1]).cpu().tolist() == per_slice


# ---------------------------------------------------------------------------- the Triton kernel
@pytest.mark.skipif("triton" not in BACKENDS, reason="needs triton on CUDA or TRITON_INTERPRET=1")
def test_triton_kernel_flags():
    """On CUDA the kernel itself reports invalid values (no host sync): check every flag here."""

    def launch(scores, tau=None, cu=None, max_seqlen=8, temperature=None, counts=None, column=slice(0, 3)):
        _, flags = nucleus_module._launch_triton(
            scores.to(DEVICE), tau, 0.9, cu, max_seqlen, temperature, 1, None, counts
        )
        return flags[:, column].cpu().tolist()

    good = torch.rand(3, 8)
    assert launch(good) == [[0, 0, 0]] * 3
    bad = good.clone()
    bad[1, 2] = float("nan")
    assert launch(bad, temperature=1.0) == [[0, 0, 0], [1, 0, 0], [0, 0, 0]]
    bad[1, 2] = -0.5
    assert launch(bad) == [[0, 0, 0], [1, 0, 0], [0, 0, 0]]
    assert launch(bad, temperature=1.0) == [[0, 0, 0]] * 3
    bad[2, 7] = float("-inf")
    assert launch(bad, temperature=1.0)[2] == [1, 0, 0]
    tau = torch.tensor([0.5, float("nan"), 0.0], device=DEVICE)
    assert launch(good, tau=tau) == [[0, 0, 0], [0, 1, 0], [0, 1, 0]]
    flat = good.reshape(-1)
    cu = torch.tensor([0, 8, 16, 24], dtype=torch.int32, device=DEVICE)
    assert launch(flat, cu=cu) == [[0, 0, 0]] * 3
    for offsets, row in (([1, 8, 16, 24], 0), ([0, 8, 16, 23], 2), ([0, 12, 16, 24], 0), ([0, 9, 7, 24], 1)):
        flags = launch(flat, cu=torch.tensor(offsets, dtype=torch.int32, device=DEVICE))
        assert flags[row][2] == 1, (offsets, flags)
    assert launch(flat, cu=torch.tensor([0, 2, 2, 24], dtype=torch.int32, device=DEVICE))[2][2] == 1
    # the budget mode's counts: flagged outside [0, n] (column 3), in both layouts
    counts = torch.tensor([0, 8, 3], dtype=torch.int32, device=DEVICE)
    assert launch(good, counts=counts, column=slice(0, 4)) == [[0, 0, 0, 0]] * 3
    assert launch(flat, cu=cu, counts=counts, column=3) == [0, 0, 0]
    for bad_counts in ([-1, 8, 3], [0, 9, 3]):
        bad_counts = torch.tensor(bad_counts, dtype=torch.int32, device=DEVICE)
        expected = [int(c < 0 or c > 8) for c in bad_counts.tolist()]
        assert launch(good, counts=bad_counts, column=3) == expected
        assert launch(flat, cu=cu, counts=bad_counts, column=3) == expected
    assert launch(flat, cu=torch.tensor([0, 8, 12, 24], dtype=torch.int32, device=DEVICE), counts=counts,
                  column=3) == [0, 1, 0]  # 8 tokens asked of a 4-token segment


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs triton on CUDA or TRITON_INTERPRET=1")
def test_triton_size_limit(monkeypatch):
    tokens = nucleus_module.MAX_TRITON_TOKENS + 1
    scores = torch.rand(1, tokens, device=DEVICE)
    limit = f"at most {nucleus_module.MAX_TRITON_TOKENS} tokens"
    with pytest.raises(ValueError, match=limit):
        nucleus_select(scores, 0.9, backend="triton")
    with pytest.raises(ValueError, match=limit):
        nucleus_select(
            scores.reshape(-1),
            0.9,
            cu_seqlens=torch.tensor([0, tokens], dtype=torch.int32, device=DEVICE),
            backend="triton",
        )
    # A Triton preference without an explicit request falls back to a path that handles any length.
    monkeypatch.setenv("MEDPRUNER_BACKEND", "triton")
    keep = nucleus_select(scores, 0.9)
    assert_matches_reference(keep, scores, 0.9)


# ------------------------------------------------------------------------- torch.library plumbing
def _op_args(backend):
    """Arguments of the registered op: scores, tau, tau_scalar, cu_seqlens, max_seqlen (the block
    bound, read by the Triton kernel only), temperature, min_keep, max_keep, counts, backend."""
    scores = _scores((6, 20), torch.float32, 1.0)
    flat = scores.reshape(-1)
    cu = torch.tensor([0, 30, 30, 120], dtype=torch.int32, device=DEVICE)
    tau = torch.tensor([0.5, 0.9, 0.7], dtype=torch.float64, device=DEVICE)
    return [
        (scores, None, 0.9, None, 20, 1.0, 1, None, None, backend),
        (flat, tau, 0.9, cu, 90, None, 2, 50, None, backend),
        (flat.abs(), None, 0.6, cu, 90, None, 0, None, None, backend),
        (scores, None, 0.9, None, 20, 2.0, 1, None, torch.tensor([0, 3, 20, 1, 5, 7], device=DEVICE), backend),
        (flat.abs(), None, 0.9, cu, 90, None, 1, None, torch.tensor([4, 0, 90], dtype=torch.int32, device=DEVICE),
         backend),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    """One registered op whose last argument names the backend; every backend passes every utility
    (the Triton path in the interpreter too: the fake never runs a launcher)."""
    for args in _op_args(backend):
        torch.library.opcheck(torch.ops.medpruner.nucleus_select, args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    scores = _scores((40, 24), torch.float32, 2.0)
    cu = torch.tensor([0, 100, 100, 960], dtype=torch.int32, device=DEVICE)
    tau = torch.tensor([0.5, 0.9, 0.8], dtype=torch.float64, device=DEVICE)

    def prune(x):
        keep = nucleus_select(x, 0.9, temperature=2.0, backend=backend)
        ragged = nucleus_select(x.reshape(-1), tau, temperature=2.0, cu_seqlens=cu, backend=backend)
        indices, cu_counts = nucleus_indices(x, 0.9, temperature=2.0, max_keep=10, backend=backend)
        return keep, ragged, indices, cu_counts

    compiled = torch.compile(prune, fullgraph=True, backend="eager" if DEVICE.type == "cpu" else "inductor")
    for got, want in zip(compiled(scores), prune(scores), strict=True):
        assert torch.equal(got, want)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="CUDA graph capture needs a GPU")
def test_cuda_graph_capture():
    scores = _scores((300, 700), torch.bfloat16, 1.0)
    expected = nucleus_select(scores, 0.9, temperature=1.0, backend="triton")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = nucleus_select(scores, 0.9, temperature=1.0, backend="triton")
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, expected)
    raise_pending_errors()


# ---------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("backend", BACKENDS)
def test_invalid_values(backend):
    scores = torch.rand(4, 9, device=DEVICE)
    for bad_value in (float("nan"), float("inf"), float("-inf")):
        bad = scores.clone()
        bad[2, 3] = bad_value
        _check_value_error(lambda b=bad: nucleus_select(b, 0.9, temperature=1.0, backend=backend), "scores")
        _check_value_error(lambda b=bad: nucleus_select(b, 0.9, backend=backend), "scores")
    negative = scores.clone()
    negative[0, 0] = -1e-3
    _check_value_error(lambda: nucleus_select(negative, 0.9, backend=backend), "scores.*non-negative")
    assert nucleus_select(negative, 0.9, temperature=1.0, backend=backend).shape == (4, 9)
    for tau in (torch.tensor([0.5, 0.0, 0.5, 0.5]), torch.tensor([0.5, float("nan"), 0.5, 0.5])):
        _check_value_error(lambda t=tau: nucleus_select(scores, t.to(DEVICE), backend=backend), "tau")
    flat = scores.reshape(-1)
    for offsets in ([1, 10, 36], [0, 20, 10, 36], [0, 10, 35], [0, 10, 40]):
        cu = torch.tensor(offsets, dtype=torch.int32, device=DEVICE)
        _check_value_error(
            lambda c=cu: nucleus_select(flat, 0.9, cu_seqlens=c, backend=backend), "cu_seqlens"
        )
    cu = torch.tensor([0, 10, 36], dtype=torch.int32, device=DEVICE)
    _check_value_error(
        lambda: nucleus_select(flat, 0.9, cu_seqlens=cu, max_seqlen=20, backend=backend), "max_seqlen"
    )


def test_invalid_arguments():
    scores = torch.rand(4, 9, device=DEVICE)
    flat = scores.reshape(-1)
    cu = torch.tensor([0, 10, 36], dtype=torch.int32, device=DEVICE)
    cases = [
        (TypeError, "scores", lambda: nucleus_select(scores.tolist(), 0.9)),
        (TypeError, "scores", lambda: nucleus_select(scores.to(torch.int32), 0.9)),
        (ValueError, "scores", lambda: nucleus_select(flat, 0.9)),
        (ValueError, "scores", lambda: nucleus_select(scores[None], 0.9)),
        (ValueError, "scores", lambda: nucleus_select(scores, 0.9, cu_seqlens=cu)),
        (ValueError, "tau", lambda: nucleus_select(scores, 0.0)),
        (ValueError, "tau", lambda: nucleus_select(scores, -0.5)),
        (ValueError, "tau", lambda: nucleus_select(scores, float("nan"))),
        (TypeError, "tau", lambda: nucleus_select(scores, True)),
        (TypeError, "tau", lambda: nucleus_select(scores, "0.9")),
        (TypeError, "tau", lambda: nucleus_select(scores, torch.ones(4, dtype=torch.int64, device=DEVICE))),
        (ValueError, "tau", lambda: nucleus_select(scores, torch.full((5,), 0.9, device=DEVICE))),
        (ValueError, "tau", lambda: nucleus_select(scores, torch.full((4, 1), 0.9, device=DEVICE))),
        (ValueError, "temperature", lambda: nucleus_select(scores, 0.9, temperature=0.0)),
        (ValueError, "temperature", lambda: nucleus_select(scores, 0.9, temperature=-1.0)),
        (ValueError, "temperature", lambda: nucleus_select(scores, 0.9, temperature=float("nan"))),
        (ValueError, "temperature", lambda: nucleus_select(scores, 0.9, temperature=float("inf"))),
        (TypeError, "temperature", lambda: nucleus_select(scores, 0.9, temperature="2")),
        (ValueError, "min_keep", lambda: nucleus_select(scores, 0.9, min_keep=-1)),
        (TypeError, "min_keep", lambda: nucleus_select(scores, 0.9, min_keep=1.5)),
        (ValueError, "max_keep", lambda: nucleus_select(scores, 0.9, min_keep=3, max_keep=2)),
        (TypeError, "max_keep", lambda: nucleus_select(scores, 0.9, max_keep=2.0)),
        (TypeError, "cu_seqlens", lambda: nucleus_select(flat, 0.9, cu_seqlens=[0, 36])),
        (TypeError, "cu_seqlens", lambda: nucleus_select(flat, 0.9, cu_seqlens=cu.float())),
        (ValueError, "cu_seqlens", lambda: nucleus_select(flat, 0.9, cu_seqlens=cu[None])),
        (ValueError, "cu_seqlens", lambda: nucleus_select(flat, 0.9, cu_seqlens=cu[:1])),
        (ValueError, "max_seqlen", lambda: nucleus_select(scores, 0.9, max_seqlen=9)),
        (ValueError, "max_seqlen", lambda: nucleus_select(flat, 0.9, cu_seqlens=cu, max_seqlen=-1)),
        (ValueError, "backend", lambda: nucleus_select(scores, 0.9, backend="cuda")),
        (TypeError, "counts", lambda: nucleus_select(scores, 0.9, counts=[1, 2, 3, 4])),
        (TypeError, "counts", lambda: nucleus_select(scores, 0.9, counts=torch.ones(4, device=DEVICE))),
        (TypeError, "counts", lambda: nucleus_select(scores, 0.9, counts=torch.ones(4, dtype=torch.int16))),
        (ValueError, "counts", lambda: nucleus_select(scores, 0.9, counts=torch.ones(5, dtype=torch.int64))),
        (ValueError, "counts", lambda: nucleus_select(scores, 0.9, counts=torch.ones(4, 1, dtype=torch.int64))),
        (ValueError, "counts", lambda: nucleus_select(flat, 0.9, cu_seqlens=cu, counts=torch.ones(4).long())),
        (TypeError, "counts", lambda: nucleus_indices(scores, 0.9, counts=torch.ones(4))),
        (ValueError, "tau", lambda: nucleus_indices(scores, 0.0)),
        (ValueError, "nucleus_indices", lambda: nucleus_indices(flat, 0.9)),
    ]
    for error, match, call in cases:
        with pytest.raises(error, match=match):
            call()


def test_env_backend_override(monkeypatch):
    scores = _scores((5, 12), torch.float32, 1.0)
    monkeypatch.setenv("MEDPRUNER_BACKEND", "torch")
    keep = nucleus_select(scores, 0.9, temperature=1.0)
    assert_matches_reference(keep, scores, 0.9, temperature=1.0)


def test_ambiguity_helper_is_narrow():
    """The exclusion helper flags only decisions within rounding, never plain ones or exact ties."""
    plain = torch.tensor([[0.5, 0.3, 0.2]])
    assert not bool(ambiguous_slices(plain, 0.7).any())
    assert not bool(ambiguous_slices(torch.ones(1, 10), 0.35).any())
    assert bool(ambiguous_slices(plain, 0.8 + 3e-6).all())
    near_tie = torch.tensor([[0.4, 0.4 * (1 - 1e-6), 0.2]], dtype=torch.float64)
    assert bool(ambiguous_slices(near_tie, 0.3).all())
