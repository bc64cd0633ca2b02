"""iaf_select / anchor_distances against the float64 sequential reference, on every backend here."""

import math
import os
from pathlib import Path

import pytest
import torch
from conftest import DEVICE, available_backends
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medpruner_kernels import anchor_distances, iaf_select, reference
from medpruner_kernels import iaf as iaf_module

BACKENDS = available_backends(cpp_ops=("iaf_select", "anchor_distances"))
VOLUME_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.uint8, torch.int16]
# The kernels accumulate in float32 (the reference in float64): a decision may differ from the
# reference only where the distance is within float32 rounding of gamma.
DECISION_RTOL = 1e-5


def _rows_and_offsets(volume, batched=False, cu_seqlens=None):
    lead = 2 if batched else 1
    rows = math.prod(volume.shape[:lead])
    slices = volume.reshape(rows, -1)
    if cu_seqlens is not None:
        return slices, cu_seqlens.cpu()
    per = volume.shape[1] if batched else volume.shape[0]
    segments = volume.shape[0] if batched else 1
    return slices, torch.arange(segments + 1, dtype=torch.int32) * per


def assert_matches_reference(volume, gamma, keep, dist=None, *, batched=False, cu_seqlens=None):
    slices, cu = _rows_and_offsets(volume, batched, cu_seqlens)
    ref_keep, ref_dist = reference.iaf_select(slices.cpu(), gamma, cu)
    keep = keep.reshape(-1).cpu()
    assert keep.dtype == torch.bool
    mismatch = (keep != ref_keep).nonzero().flatten()
    if mismatch.numel():
        first = int(mismatch[0])
        d = float(ref_dist[first])
        assert abs(d - gamma) <= DECISION_RTOL * max(abs(gamma), abs(d), 1e-6), (
            f"slice {first}: kernel keep={bool(keep[first])}, reference keep={bool(ref_keep[first])}, "
            f"reference distance {d!r} is not within rounding of gamma {gamma!r}"
        )
        agree = slice(0, first)
    else:
        agree = slice(None)
    if dist is not None:
        got = dist.reshape(-1).cpu().double()[agree]
        torch.testing.assert_close(got, ref_dist[agree], rtol=1e-5, atol=1e-6 * _scale(volume))


def _scale(volume):
    return 1.0 if volume.dtype.is_floating_point else 255.0


def _gamma_between(volume, quantile, batched=False):
    """A gamma at the given quantile of adjacent-slice distances, so some slices are kept and some not."""
    slices, _ = _rows_and_offsets(volume, batched)
    x = slices.double()
    adjacent = (x[1:] - x[:-1]).abs().mean(dim=1)
    if adjacent.numel() == 1:
        # Every quantile of one distance is that distance, a decision only rounding settles: move
        # clear of it (below keeps the slice, above drops it), so the test checks the decision.
        return float(adjacent[0]) * (0.5 if quantile < 0.5 else 2.0)
    return float(torch.quantile(adjacent, quantile)) if adjacent.numel() else 0.1


def _random_volume(shape, dtype, drift=0.3):
    steps = torch.randn(shape, dtype=torch.float64) * drift
    walk = torch.cumsum(steps, dim=0 if len(shape) else 0)
    if dtype == torch.uint8:
        return (walk * 20 + 128).clamp(0, 255).to(torch.uint8)
    if dtype == torch.int16:
        return (walk * 300).clamp(-32768, 32767).to(torch.int16)
    return walk.to(dtype)


SHAPES = {
    "one-slice": (1, 8, 8),
    "two-slices": (2, 5, 7),
    "small": (24, 6, 10),
    "channels": (30, 3, 4, 4),
    "long": (150, 4, 4),
    "odd-cols": (40, 17, 19),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", VOLUME_DTYPES, ids=str)
@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_random_volumes(backend, dtype, shape_name):
    volume = _random_volume(SHAPES[shape_name], dtype).to(DEVICE)
    for quantile in (0.3, 0.9):
        gamma = _gamma_between(volume, quantile)
        keep, dist = iaf_select(volume, gamma, backend=backend, return_distances=True)
        assert keep.shape == volume.shape[:1]
        assert bool(keep[0])
        assert_matches_reference(volume, gamma, keep, dist)


@pytest.mark.parametrize("backend", BACKENDS)
def test_slow_drift_needs_distances_beyond_the_band(backend):
    # A slow drift with a large gamma keeps a slice only every ~60 slices: every decision after the
    # first BAND slices needs a distance to an anchor outside the band (the row rounds on Triton).
    depth = 400
    base = torch.randn(12, 12, dtype=torch.float64)
    ramp = torch.linspace(0, 1, depth, dtype=torch.float64)[:, None, None]
    volume = (base + ramp * 6.0 + 0.01 * torch.randn(depth, 12, 12, dtype=torch.float64)).float()
    keep, dist = iaf_select(volume.to(DEVICE), 0.9, backend=backend, return_distances=True)
    assert 3 <= int(keep.sum()) <= depth // (iaf_module.BAND + 1)
    assert_matches_reference(volume, 0.9, keep, dist)


@pytest.mark.parametrize("backend", BACKENDS)
def test_piecewise_constant_organs(backend):
    # Blocks of identical slices (distance exactly 0) separated by jumps: exactly the first slice of
    # each block is kept.
    blocks = [3, 1, 20, 7, 40, 2]
    levels = torch.randn(len(blocks), 9, 9)
    volume = torch.cat([lvl.expand(n, 9, 9) for lvl, n in zip(levels, blocks, strict=True)]).contiguous()
    keep = iaf_select(volume.to(DEVICE), 1e-3, backend=backend).cpu()
    expected = torch.zeros(sum(blocks), dtype=torch.bool)
    expected[torch.tensor([0, *torch.tensor(blocks).cumsum(0)[:-1].tolist()])] = True
    assert torch.equal(keep, expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8], ids=str)
def test_constant_volume(backend, dtype):
    volume = torch.full((33, 4, 4), 7, dtype=dtype, device=DEVICE)
    keep, dist = iaf_select(volume, 0.0, backend=backend, return_distances=True)
    assert keep.cpu().tolist() == [True] + [False] * 32
    assert float(dist.abs().max()) == 0.0
    assert bool(iaf_select(volume, -1.0, backend=backend).all()), "a negative gamma keeps every slice"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int16], ids=str)
def test_batched_volumes(backend, dtype):
    volume = _random_volume((40, 3, 6, 6), dtype).permute(1, 0, 2, 3).contiguous().to(DEVICE)
    gamma = _gamma_between(volume[0], 0.7)
    keep, dist = iaf_select(volume, gamma, batched=True, backend=backend, return_distances=True)
    assert keep.shape == (3, 40)
    assert_matches_reference(volume, gamma, keep, dist, batched=True)
    for b in range(3):
        assert torch.equal(keep[b], iaf_select(volume[b], gamma, backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_with_empty_and_single_volumes(backend):
    lengths = [5, 0, 1, 37, 60, 0, 2]
    volume = _random_volume((sum(lengths), 7, 5), torch.float32).to(DEVICE)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    gamma = _gamma_between(volume, 0.8)
    keep, dist = iaf_select(volume, gamma, cu_seqlens=cu, backend=backend, return_distances=True)
    assert keep.shape == (sum(lengths),)
    assert_matches_reference(volume, gamma, keep, dist, cu_seqlens=cu)
    # Each volume's first slice is kept and equals the single-volume result.
    offsets = cu.tolist()
    for start, end in zip(offsets[:-1], offsets[1:], strict=True):
        if end > start:
            assert torch.equal(keep[start:end], iaf_select(volume[start:end], gamma, backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    base = _random_volume((50, 12, 16), torch.float32).to(DEVICE)
    views = {
        "transposed-slices": base.transpose(1, 2),
        "strided-slices": base[::2],
        "cropped": base[:, 2:10, 3:13],
        "slice-axis-last": base.permute(1, 2, 0).contiguous().permute(2, 0, 1),
    }
    for name, view in views.items():
        gamma = _gamma_between(view.contiguous(), 0.6)
        keep = iaf_select(view, gamma, backend=backend)
        assert torch.equal(keep, iaf_select(view.contiguous(), gamma, backend=backend)), name
        assert_matches_reference(view.contiguous(), gamma, keep)


@pytest.mark.parametrize("backend", BACKENDS)
def test_wide_slices_use_many_column_tiles(backend):
    # More columns than MAX_TILES * BLOCK_P: several BLOCK_P chunks per tile in the Triton kernels.
    cols = iaf_module.MAX_TILES * iaf_module.BLOCK_P + 300
    volume = _random_volume((20, cols), torch.float16, drift=0.05).to(DEVICE)
    gamma = _gamma_between(volume, 0.5)
    keep, dist = iaf_select(volume, gamma, backend=backend, return_distances=True)
    assert_matches_reference(volume, gamma, keep, dist)


@pytest.mark.skipif("cpp" not in BACKENDS, reason="needs the compiled extension")
@pytest.mark.parametrize("dtype", VOLUME_DTYPES, ids=str)
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("depth", [2, 3, 40, 41, 42])
def test_cpp_scan_splits_large_slices_across_threads(dtype, threads, depth):
    # Above 32768 columns one volume's scan runs on all threads, each owning a column range; the column
    # count is odd so the last range ends inside a lane group. The scan decides three slices per sweep,
    # so the depths end it on a full sweep and on sweeps of one and two slices.
    volume = _random_volume((depth, 257 * 131), dtype, drift=0.05)
    gamma = _gamma_between(volume, 0.5)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        keep, dist = iaf_select(volume, gamma, backend="cpp", return_distances=True)
    finally:
        torch.set_num_threads(previous)
    assert_matches_reference(volume, gamma, keep, dist)


# Bit patterns of the non-negative finite values of each 16-bit float, split by magnitude so that an
# error in one class (subnormals above all) is not hidden by the larger values of another. bfloat16
# subnormals are float32 subnormals, whose float32 sums (the op's accumulation) carry no 2e-6
# relative precision; its widening is a shift, the same for every class. Its values stop at 2^64:
# a row of larger ones sums past float32's range, which the op rejects as overflow.
HALF_CLASSES = {
    torch.float16: {"subnormal": (1, 0x400), "below-one": (0x400, 0x3C00), "one-and-above": (0x3C00, 0x7C00)},
    torch.bfloat16: {"below-one": (0x80, 0x3F80), "one-to-2^64": (0x3F80, 0x5F80)},
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", list(HALF_CLASSES), ids=str)
@pytest.mark.parametrize("cols", [1000, 40000])  # the C++ serial and threaded scans
def test_every_half_precision_value_widens_exactly(backend, dtype, cols):
    rows = []
    for low, high in HALF_CLASSES[dtype].values():
        values = torch.arange(low, high, dtype=torch.int32).to(torch.int16).view(dtype)
        row = values.repeat(cols // values.numel() + 1)[:cols]
        rows += [torch.zeros(cols, dtype=dtype), row, -row]
    volume = torch.stack(rows).to(DEVICE)
    cu = torch.arange(0, len(rows) + 1, 3, dtype=torch.int32, device=DEVICE)
    keep, dist = iaf_select(volume, -1.0, cu_seqlens=cu, backend=backend, return_distances=True)
    assert bool(keep.all())
    _, ref_dist = reference.iaf_select(volume.cpu(), -1.0, cu.cpu())
    torch.testing.assert_close(dist.cpu().double(), ref_dist, rtol=2e-6, atol=0.0)
    # The C++ scan widens half with F16C where the CPU has it; anchor_distances always takes the
    # portable bit-pattern widening, so both are checked on a machine with F16C.
    again = anchor_distances(volume, keep, cu_seqlens=cu, backend=backend)
    torch.testing.assert_close(again.cpu().double(), ref_dist, rtol=2e-6, atol=0.0)


def _real_volume():
    nibabel = pytest.importorskip("nibabel")
    path = Path(nibabel.__file__).parent / "tests" / "data" / "example4d.nii.gz"
    data = torch.from_numpy(nibabel.load(path).get_fdata()[..., 0]).permute(2, 0, 1)  # [24, 128, 96]
    # The models' [-1, 1] scale (mean = std = 0.5 on [0, 1] intensities), where gamma = 0.05 is the paper's.
    unit = (data - data.min()) / (data.max() - data.min())
    return (unit * 2 - 1).float().contiguous()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_real_mri_volume(backend, dtype):
    volume = _real_volume().to(dtype)
    if backend == "triton" and DEVICE.type == "cpu":
        volume = volume[:, ::4, ::4]  # the interpreter is slow; the slices stay real anatomy
    volume = volume.to(DEVICE)
    for gamma in (0.01, 0.05, 0.2):
        keep, dist = iaf_select(volume, gamma, backend=backend, return_distances=True)
        assert_matches_reference(volume, gamma, keep, dist)


def _reference_anchor_distances(volume, keep, cu):
    slices = volume.reshape(keep.numel(), -1).cpu()
    return reference.anchor_distances(slices, keep.reshape(-1).cpu(), cu)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.uint8], ids=str)
def test_anchor_distances_for_any_keep_mask(backend, dtype):
    lengths = [9, 1, 0, 30]
    volume = _random_volume((sum(lengths), 5, 6), dtype).to(DEVICE)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    keep = torch.rand(sum(lengths)) < 0.3
    got = anchor_distances(volume, keep.to(DEVICE), cu_seqlens=cu.to(DEVICE), backend=backend)
    expected = _reference_anchor_distances(volume, keep, cu)
    torch.testing.assert_close(got.cpu().double(), expected, rtol=1e-5, atol=1e-6 * _scale(volume))


@pytest.mark.parametrize("backend", BACKENDS)
def test_anchor_distances_match_iaf_distances(backend):
    volume = _random_volume((64, 8, 8), torch.float32).to(DEVICE)
    gamma = _gamma_between(volume, 0.8)
    keep, dist = iaf_select(volume, gamma, backend=backend, return_distances=True)
    torch.testing.assert_close(anchor_distances(volume, keep, backend=backend), dist, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_agree_with_each_other(backend):
    volume = _random_volume((90, 10, 10), torch.bfloat16).to(DEVICE)
    gamma = _gamma_between(volume, 0.75)
    assert torch.equal(iaf_select(volume, gamma, backend=backend), iaf_select(volume, gamma, backend="torch"))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    depth=st.integers(1, 70),
    height=st.integers(1, 9),
    width=st.integers(1, 9),
    quantile=st.floats(0.0, 1.0),
    dtype=st.sampled_from(VOLUME_DTYPES),
    drift=st.sampled_from([0.01, 0.3, 3.0]),
    seed=st.integers(0, 2**16),
)
def test_property_all_backends_match_reference(depth, height, width, quantile, dtype, drift, seed):
    torch.manual_seed(seed)
    volume = _random_volume((depth, height, width), dtype, drift).to(DEVICE)
    gamma = _gamma_between(volume, quantile) if depth > 1 else 0.1
    for backend in BACKENDS:
        keep, dist = iaf_select(volume, gamma, backend=backend, return_distances=True)
        assert_matches_reference(volume, gamma, keep, dist)


# ----------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: iaf_select(torch.rand(10), 0.1), ValueError, "volume must be"),
        (lambda: iaf_select(torch.rand(0, 4, 4), 0.1), ValueError, "no slices"),
        (lambda: iaf_select(torch.rand(3, 0, 4), 0.1), ValueError, "empty slices"),
        (lambda: iaf_select(torch.rand(3, 4, 4).to(torch.int32), 0.1), TypeError, "dtype"),
        (lambda: iaf_select(torch.rand(3, 4, 4) > 0.5, 0.1), TypeError, "dtype"),
        (lambda: iaf_select([[1.0]], 0.1), TypeError, "volume must be a torch.Tensor"),
        (lambda: iaf_select(torch.rand(3, 4), float("nan")), ValueError, "gamma"),
        (lambda: iaf_select(torch.rand(3, 4), "0.1"), TypeError, "gamma"),
        (lambda: iaf_select(torch.rand(3, 4), torch.tensor(0.1)), TypeError, "gamma"),
        (lambda: iaf_select(torch.rand(3, 4), 0.1, backend="cuda"), ValueError, "backend"),
        (lambda: iaf_select(torch.rand(2, 3, 4), 0.1, batched=True, cu_seqlens=torch.tensor([0, 2])),
         ValueError, "not both"),
        (lambda: iaf_select(torch.rand(3, 4), 0.1, cu_seqlens=torch.tensor([0, 2], dtype=torch.int32)),
         ValueError, "cu_seqlens"),
        (lambda: iaf_select(torch.rand(3, 4), 0.1, cu_seqlens=torch.tensor([1, 3], dtype=torch.int32)),
         ValueError, "cu_seqlens"),
        (lambda: iaf_select(torch.rand(3, 4), 0.1, cu_seqlens=torch.tensor([0, 3, 2, 3], dtype=torch.int32)),
         ValueError, "cu_seqlens"),
        (lambda: iaf_select(torch.rand(3, 4), 0.1, cu_seqlens=torch.tensor([0.0, 3.0])), TypeError, "cu_seqlens"),
        (lambda: iaf_select(torch.rand(3, 4), 0.1, cu_seqlens=torch.tensor([[0, 3]], dtype=torch.int32)),
         ValueError, "cu_seqlens"),
        (lambda: anchor_distances(torch.rand(3, 4), torch.ones(4, dtype=torch.bool)), ValueError, "keep has shape"),
        (lambda: anchor_distances(torch.rand(3, 4), torch.ones(3)), TypeError, "keep must be a bool"),
    ],
)  # fmt: skip
def test_bad_input_is_rejected_with_the_argument_named(make, error, match):
    with pytest.raises(error, match=match):
        make()


def _poison(shape, row, value, dtype):
    volume = torch.rand(shape, dtype=torch.float64)
    volume.reshape(shape[0], -1)[row, 3] = value
    return volume.to(dtype)


# (volume shape, cu_seqlens, poisoned row): the row enters a distance as the compared slice, as the
# anchor, as a volume's first slice, or compares nothing (a 1-slice volume, alone or in a varlen batch).
NON_FINITE_CASES = {
    "middle-slice": ((12, 5, 6), None, 7),
    "first-slice": ((12, 5, 6), None, 0),
    "last-slice": ((12, 5, 6), None, 11),
    "one-slice-volume": ((1, 5, 6), None, 0),
    "lone-slice-in-varlen": ((9, 5, 6), [0, 4, 5, 9], 4),
    "first-of-second-volume": ((9, 5, 6), [0, 4, 5, 9], 5),
    "wide-slices-threaded": ((5, 184, 184), None, 3),
}
# Wide slices only change the C++ path (its threaded scan); the interpreted Triton kernel is slow there.
NON_FINITE_RUNS = [
    (case, backend)
    for case in NON_FINITE_CASES
    for backend in BACKENDS
    if not (case == "wide-slices-threaded" and backend == "triton")
]


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("case, backend", NON_FINITE_RUNS)
def test_non_finite_volume_is_rejected(backend, value, dtype, case):
    shape, offsets, row = NON_FINITE_CASES[case]
    volume = _poison(shape, row, value, dtype).to(DEVICE)
    cu = None if offsets is None else torch.tensor(offsets, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="iaf_select: volume contains NaN or Inf"):
        iaf_select(volume, 0.1, cu_seqlens=cu, backend=backend)
    keep = torch.ones(shape[0], dtype=torch.bool, device=DEVICE)
    with pytest.raises(ValueError, match="anchor_distances: volume contains NaN or Inf"):
        anchor_distances(volume, keep, cu_seqlens=cu, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_finite_values_whose_difference_overflows_are_rejected(backend):
    big = torch.finfo(torch.float32).max
    volume = torch.full((3, 4, 4), big)
    volume[1] = -big
    with pytest.raises(ValueError, match="overflow float32"):
        iaf_select(volume.to(DEVICE), 0.1, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lone_finite_slices_pass_the_check(backend):
    volume = torch.rand(9, 5, 6, device=DEVICE)
    cu = torch.tensor([0, 1, 2, 9], dtype=torch.int32, device=DEVICE)
    keep = iaf_select(volume, 0.1, cu_seqlens=cu, backend=backend)
    assert_matches_reference(volume, 0.1, keep, cu_seqlens=cu)


def test_negative_gamma_keeps_every_slice():
    volume = _random_volume((20, 3, 3), torch.float32)
    for backend in BACKENDS:
        assert bool(iaf_select(volume, -0.5, backend=backend).all())


def test_unavailable_explicit_backend_raises(monkeypatch):
    from medpruner_kernels import _dispatch

    monkeypatch.setattr(_dispatch, "CPP_AVAILABLE", False)
    with pytest.raises(RuntimeError, match="compiled extension"):
        iaf_select(torch.rand(4, 3), 0.1, backend="cpp")
    monkeypatch.setenv("MEDPRUNER_BACKEND", "torch")
    assert iaf_select(torch.rand(4, 3), 0.1).shape == (4,)


# ------------------------------------------------------------------------- torch.library plumbing
@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    """Each public function is one registered op whose last argument names the backend; every
    backend's kernel passes every opcheck utility (the fake is shared, so the Triton path is checked
    in the interpreter too)."""
    slices = _random_volume((30, 24), torch.float32).to(DEVICE)
    cu = torch.tensor([0, 12, 30], dtype=torch.int32, device=DEVICE)
    # Offsets (seqlen the longest volume) or none (volumes of seqlen rows each).
    for args in [(slices, cu, 18, 0.2, backend), (slices, None, 15, 0.2, backend)]:
        torch.library.opcheck(torch.ops.medpruner.iaf_select, args)
    anchor = torch.tensor([0] * 12 + [12] * 18, dtype=torch.int64, device=DEVICE)
    torch.library.opcheck(torch.ops.medpruner.anchor_distances, (slices, anchor, backend))


# make_fx runs the real ops while it records, and the triton/torch paths' NaN check reads a flag on the
# host, which it refuses (torch.compile skips the check); the compiled kernel checks inside the op.
@pytest.mark.skipif("cpp" not in BACKENDS, reason="needs the compiled extension")
@pytest.mark.parametrize("backend", ["cpp"])
def test_tracers_record_the_registered_op(backend):
    # Eager calls go straight to the kernel; anything that records or intercepts the call (here
    # make_fx, through its dispatch mode) must see the registered op with its backend, not constants.
    from torch.fx.experimental.proxy_tensor import make_fx

    volume = _random_volume((12, 5, 5), torch.float32).to(DEVICE)
    gamma = _gamma_between(volume, 0.5)
    traced = make_fx(lambda v: iaf_select(v, gamma, backend=backend, return_distances=True))(volume)
    calls = [node for node in traced.graph.nodes if str(node.target) == "medpruner.iaf_select.default"]
    assert len(calls) == 1 and calls[0].args[-1] == backend
    other = _random_volume((12, 5, 5), torch.float32).to(DEVICE)
    for got, want in zip(traced(other), iaf_select(other, gamma, backend=backend, return_distances=True)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_column_volume_with_any_stride(backend):
    # A transposed [1, D] volume is [D, 1] with column stride D: one column needs no unit stride.
    volume = _random_volume((1, 9), torch.float32).t().to(DEVICE)
    gamma = _gamma_between(volume, 0.5)
    keep, dist = iaf_select(volume, gamma, backend=backend, return_distances=True)
    assert_matches_reference(volume, gamma, keep, dist)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    # The registered op is opaque to the compiler, so the Triton path compiles under the interpreter too.
    volume = _random_volume((40, 6, 6), torch.float32).to(DEVICE)
    gamma = _gamma_between(volume, 0.7)

    def prune(v):
        keep, dist = iaf_select(v, gamma, backend=backend, return_distances=True)
        return keep, dist, anchor_distances(v, keep, backend=backend)

    compiled = torch.compile(prune, fullgraph=True, backend="eager" if DEVICE.type == "cpu" else "inductor")
    keep, dist, again = compiled(volume)
    eager_keep, eager_dist, _ = prune(volume)
    assert torch.equal(keep, eager_keep)
    torch.testing.assert_close(dist, eager_dist)
    torch.testing.assert_close(again, dist, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="CUDA graph capture needs a GPU")
def test_cuda_graph_capture():
    volume = _random_volume((300, 32, 32), torch.bfloat16).to(DEVICE)
    gamma = _gamma_between(volume, 0.9)
    expected = iaf_select(volume, gamma, backend="triton")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = iaf_select(volume, gamma, backend="triton")
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, expected)


def test_interpreter_is_active_without_gpu():
    if DEVICE.type == "cpu":
        assert os.environ.get("TRITON_INTERPRET") == "1"
        assert "triton" in BACKENDS, "Triton kernels must be tested on CPU through the interpreter"


# ------------------------------------------------------------- Triton path: bytes, launches, int64
def _slow_drift_volume(depth, side, dtype, seed=0):
    """A slow ramp (few keeps for a large gamma: runs much longer than the band) with a little noise."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(side, side, generator=gen, dtype=torch.float64)
    ramp = torch.linspace(0, 1, depth, dtype=torch.float64)[:, None, None]
    walk = base + ramp * 6.0 + 0.01 * torch.randn(depth, side, side, generator=gen, dtype=torch.float64)
    if dtype == torch.uint8:
        return (walk * 20 + 100).clamp(0, 255).to(dtype)
    if dtype == torch.int16:
        return (walk * 300).to(dtype)
    return walk.to(dtype)


def _regime_volume(regime, depth, side, dtype):
    """(volume, gamma): many keeps (noisy random walk, gamma at the 20% quantile of adjacent distances:
    the anchor stays within the band) or few keeps (slow drift, runs of ~40-60 slices)."""
    if regime == "many-keeps":
        volume = _random_volume((depth, side, side), dtype)
        return volume, _gamma_between(volume, 0.2)
    volume = _slow_drift_volume(depth, side, dtype)
    return volume, 0.9 * (1.0 if dtype.is_floating_point else (20.0 if dtype == torch.uint8 else 300.0))


class _InterpreterCounter:
    """Counts, under the Triton interpreter, the bytes that loads touch (only the lanes a mask lets
    through) and the kernel launches, by wrapping the interpreter's masked load and grid executor."""

    def __init__(self, monkeypatch):
        from triton.runtime import interpreter

        self.loaded_bytes = 0
        self.launches = []
        load = interpreter.InterpreterBuilder.create_masked_load
        run = interpreter.GridExecutor.__call__

        def counting_load(builder, ptrs, mask, other, cache_policy, is_volatile):
            width = ptrs.get_element_ty().primitive_bitwidth // 8
            self.loaded_bytes += int(mask.data.sum()) * width
            return load(builder, ptrs, mask, other, cache_policy, is_volatile)

        def counting_run(executor, *args, **kwargs):
            self.launches.append(executor.fn.__name__)
            return run(executor, *args, **kwargs)

        monkeypatch.setattr(interpreter.InterpreterBuilder, "create_masked_load", counting_load)
        monkeypatch.setattr(interpreter.GridExecutor, "__call__", counting_run)


needs_interpreter = pytest.mark.skipif(
    "triton" not in BACKENDS or DEVICE.type != "cpu", reason="counts loads in the Triton interpreter"
)


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.uint8], ids=str)
@pytest.mark.parametrize("side", [32, 40])  # one band tile; two tiles (the reduce pass runs)
@pytest.mark.parametrize("regime, bound", [("many-keeps", 1.2), ("few-keeps", 2.2)])
def test_triton_loads_each_element_about_once(monkeypatch, regime, bound, side, dtype):
    volume, gamma = _regime_volume(regime, 300, side, dtype)
    counter = _InterpreterCounter(monkeypatch)
    keep, dist = iaf_select(volume, gamma, backend="triton", return_distances=True)
    assert_matches_reference(volume, gamma, keep, dist)
    gaps = torch.diff(keep.nonzero().flatten(), append=torch.tensor([volume.shape[0]]))
    if regime == "many-keeps":
        assert int(gaps.max()) <= iaf_module.BAND, "the anchor must stay within the band"
    else:
        assert int(gaps.max()) > 3 * iaf_module.BAND, "long runs must need distances to an older anchor"
    ratio = counter.loaded_bytes / (volume.numel() * volume.element_size())
    lower = 1.0 if regime == "many-keeps" else 1.5  # every element once; long runs read most slices twice
    assert lower <= ratio <= bound, f"loaded {ratio:.3f}x the volume's bytes"


@needs_interpreter
@pytest.mark.parametrize("regime", ["many-keeps", "few-keeps"])
def test_triton_launch_count_does_not_grow_with_depth(monkeypatch, regime):
    counter = _InterpreterCounter(monkeypatch)
    launches = {}
    for depth in (64, 300):
        volume, gamma = _regime_volume(regime, depth, 8, torch.float32)
        counter.launches = []
        keep = iaf_select(volume, gamma, backend="triton")
        assert_matches_reference(volume, gamma, keep)
        launches[depth] = counter.launches
    assert launches[64] == launches[300]
    assert len(launches[300]) <= 3


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.uint8, torch.int16], ids=str)
def test_few_keeps_in_every_dtype(backend, dtype):
    # Runs of ~40-60 slices: every decision after the band takes the row requests on Triton.
    volume, gamma = _regime_volume("few-keeps", 260, 6, dtype)
    keep, dist = iaf_select(volume.to(DEVICE), gamma, backend=backend, return_distances=True)
    assert 3 <= int(keep.sum()) <= 260 // (iaf_module.BAND + 1)
    assert_matches_reference(volume, gamma, keep, dist)


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_volumes_with_long_runs(backend):
    # Several scanners publish row requests in the same launch; volumes of 0, 1 and few slices between.
    parts = [_slow_drift_volume(n, 7, torch.float32, seed=n) for n in (150, 1, 0, 90, 3, 120)]
    volume = torch.cat(parts).to(DEVICE)
    lengths = torch.tensor([p.shape[0] for p in parts])
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]).to(torch.int32).to(DEVICE)
    keep, dist = iaf_select(volume, 0.9, cu_seqlens=cu, backend=backend, return_distances=True)
    assert_matches_reference(volume, 0.9, keep, dist, cu_seqlens=cu)
    again = iaf_select(volume, 0.9, cu_seqlens=cu, max_seqlen=150, backend=backend)
    assert torch.equal(again, keep)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32], ids=str)
def test_element_offsets_past_2_31(backend, dtype):
    # Slices 2**27 elements apart in one huge storage: the last rows start past element 2**31. Only the
    # pages the view touches are ever written or read, so this costs a few MB of real memory.
    depth, stride = 20, 1 << 27
    storage = torch.empty(stride * (depth - 1) + 16 * 16, dtype=dtype, device=DEVICE)
    view = storage.as_strided((depth, 16, 16), (stride, 16, 1))
    assert view.storage_offset() + (depth - 1) * stride > 2**31
    values = _random_volume((depth, 16, 16), dtype)
    view.copy_(values.to(DEVICE))
    # gamma < 0 keeps every slice: every adjacent distance is returned, those of the rows past 2**31
    # included; the median gamma checks decisions there too.
    for gamma in (-1.0, _gamma_between(values, 0.5)):
        keep, dist = iaf_select(view, gamma, backend=backend, return_distances=True)
        assert_matches_reference(values, gamma, keep, dist)
    again = anchor_distances(view, keep, backend=backend)
    expected = _reference_anchor_distances(values, keep, torch.tensor([0, depth]))
    torch.testing.assert_close(again.cpu().double(), expected)
