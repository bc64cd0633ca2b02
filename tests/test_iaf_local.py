"""iaf_local_select against the float64 reference, on every backend and volume dtype."""

import math

import pytest
import torch
from conftest import DEVICE, available_backends
from test_iaf import DECISION_RTOL, _InterpreterCounter, _random_volume, _real_volume, _slow_drift_volume

from medpruner_kernels import iaf_local as local_module
from medpruner_kernels import iaf_local_select, iaf_select, reference

BACKENDS = available_backends(cpp_ops=("iaf_local_select",))
VOLUME_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.uint8, torch.int16]


def _offsets(volume, batched=False, cu_seqlens=None):
    if cu_seqlens is not None:
        return cu_seqlens.cpu()
    per = volume.shape[1] if batched else volume.shape[0]
    segments = volume.shape[0] if batched else 1
    return torch.arange(segments + 1, dtype=torch.int32) * per


def assert_matches_reference(volume, gamma, block, keep, dist=None, *, batched=False, cu_seqlens=None):
    """``block`` an int (contiguous runs of the flattened slice, as the op takes it)."""
    lead = 2 if batched else 1
    slices = volume.reshape(math.prod(volume.shape[:lead]), -1).cpu()
    ref_keep, ref_dist = reference.iaf_local_select(slices, gamma, _offsets(volume, batched, cu_seqlens), block)
    keep = keep.reshape(-1).cpu()
    assert keep.dtype == torch.bool
    mismatch = (keep != ref_keep).nonzero().flatten()
    agree = slice(None)
    if mismatch.numel():
        first = int(mismatch[0])
        d = float(ref_dist[first])
        assert abs(d - gamma) <= DECISION_RTOL * max(abs(gamma), abs(d), 1e-6), (
            f"slice {first}: kernel keep={bool(keep[first])}, reference {bool(ref_keep[first])}, reference "
            f"distance {d!r} is not within rounding of gamma {gamma!r}"
        )
        agree = slice(0, first)
    if dist is not None:
        scale = 1.0 if volume.dtype.is_floating_point else 255.0
        got = dist.reshape(-1).cpu().double()[agree]
        torch.testing.assert_close(got, ref_dist[agree], rtol=1e-5, atol=1e-6 * scale)


def _gamma_between(volume, block, quantile):
    """A gamma_local at a quantile of adjacent-slice local distances: some slices kept, some not."""
    x = volume.reshape(volume.shape[0], -1).double().cpu()
    if x.shape[0] < 2:
        return 0.1
    adjacent = (x[1:] - x[:-1]).abs().reshape(x.shape[0] - 1, -1, block).mean(dim=2).amax(dim=1)
    if adjacent.numel() == 1:
        return float(adjacent[0]) * (0.5 if quantile < 0.5 else 2.0)
    return float(torch.quantile(adjacent, quantile))


# (shape, block): one block per slice, several, odd block sizes, one element per block, a long volume.
CASES = {
    "one-slice": ((1, 8, 8), 16),
    "two-slices": ((2, 6, 6), 12),
    "small": ((24, 6, 10), 20),
    "channels": ((30, 3, 4, 4), 48),
    "single-block": ((20, 5, 7), 35),
    "element-blocks": ((16, 3, 3), 1),
    "odd-blocks": ((40, 17, 21), 51),
    "long": ((150, 4, 8), 8),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", VOLUME_DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_random_volumes(backend, dtype, case):
    shape, block = CASES[case]
    volume = _random_volume(shape, dtype).to(DEVICE)
    for quantile in (0.3, 0.9):
        gamma = _gamma_between(volume, block, quantile)
        keep, dist = iaf_local_select(volume, gamma, block=block, backend=backend, return_distances=True)
        assert keep.shape == volume.shape[:1]
        assert bool(keep[0])
        assert_matches_reference(volume, gamma, block, keep, dist)


def _lesion_volume(depth=24, side=32, seed=0):
    """Slowly varying anatomy; slices 10-12 gain a bright 4x4 spot: a small change of the slice mean,
    a large one of the block that holds it."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.rand(side, side, generator=gen)
    volume = base + 0.002 * torch.randn(depth, side, side, generator=gen)
    volume[10:13, 8:12, 8:12] += 1.0
    return volume


@pytest.mark.parametrize("backend", BACKENDS)
def test_small_finding_kept_where_plain_iaf_drops_it(backend):
    volume = _lesion_volume().to(DEVICE)
    plain = iaf_select(volume, 0.02, backend=backend)
    local = iaf_local_select(volume, 0.2, block=(8, 8), backend=backend)
    assert not bool(plain[10]), "the spot moves the slice mean by 16/1024: plain IAF must drop it"
    assert local.nonzero().flatten().tolist() == [0, 10, 13]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8], ids=str)
def test_one_block_per_slice_is_plain_iaf(backend, dtype):
    volume = _random_volume((60, 6, 9), dtype).to(DEVICE)
    for quantile in (0.2, 0.8):
        gamma = _gamma_between(volume, 54, quantile)
        keep, dist = iaf_local_select(volume, gamma, block=54, backend=backend, return_distances=True)
        plain_keep, plain_dist = iaf_select(volume, gamma, backend=backend, return_distances=True)
        assert torch.equal(keep, plain_keep)
        torch.testing.assert_close(dist, plain_dist, rtol=1e-5, atol=1e-6 * (255 if dtype == torch.uint8 else 1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_tuple_block_tiles_the_slice(backend):
    volume = _random_volume((20, 16, 12), torch.float32).to(DEVICE)
    tiled = volume.reshape(20, 4, 4, 3, 4).permute(0, 1, 3, 2, 4).reshape(20, -1)
    gamma = _gamma_between(tiled, 16, 0.5)
    keep, dist = iaf_local_select(volume, gamma, block=(4, 4), backend=backend, return_distances=True)
    assert_matches_reference(tiled, gamma, 16, keep, dist)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.uint8, torch.int16], ids=str)
def test_constant_volume_keeps_only_the_first_slice(backend, dtype):
    volume = torch.full((12, 5, 6), 7, dtype=dtype, device=DEVICE)
    keep, dist = iaf_local_select(volume, 0.0, block=10, backend=backend, return_distances=True)
    assert keep.nonzero().flatten().tolist() == [0]
    assert not bool(dist.any())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int16], ids=str)
def test_batched_volumes(backend, dtype):
    volume = _random_volume((3, 25, 4, 6), dtype).to(DEVICE)
    gamma = _gamma_between(volume.reshape(75, -1), 8, 0.6)
    keep, dist = iaf_local_select(volume, gamma, block=8, batched=True, backend=backend, return_distances=True)
    assert keep.shape == (3, 25) and dist.shape == (3, 25)
    assert_matches_reference(volume, gamma, 8, keep, dist, batched=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_with_empty_single_and_long_runs(backend):
    parts = [_slow_drift_volume(n, 6, torch.float32, seed=n) for n in (70, 1, 0, 40, 3, 50)]
    volume = torch.cat(parts).to(DEVICE)
    lengths = torch.tensor([p.shape[0] for p in parts])
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]).to(torch.int32).to(DEVICE)
    # A gamma with runs far longer than the band: the Triton scan computes distances to old anchors.
    keep, dist = iaf_local_select(volume, 1.0, block=12, cu_seqlens=cu, backend=backend, return_distances=True)
    gaps = torch.diff(keep.nonzero().flatten().cpu())
    assert int(gaps.max()) > local_module.BAND
    assert_matches_reference(volume, 1.0, 12, keep, dist, cu_seqlens=cu)
    again = iaf_local_select(volume, 1.0, block=12, cu_seqlens=cu, max_seqlen=70, backend=backend)
    assert torch.equal(again, keep)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.uint8, torch.int16], ids=str)
def test_few_keeps_in_every_dtype(backend, dtype):
    volume = _slow_drift_volume(120, 6, dtype)
    scale = 1.0 if dtype.is_floating_point else (20.0 if dtype == torch.uint8 else 300.0)
    keep, dist = iaf_local_select(volume.to(DEVICE), 0.9 * scale, block=9, backend=backend, return_distances=True)
    assert 2 <= int(keep.sum()) <= 120 // (local_module.BAND + 1)
    assert_matches_reference(volume, 0.9 * scale, 9, keep, dist)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    base = _random_volume((30, 12, 16), torch.float32).to(DEVICE)
    for view in (base[::2], base[:, :, ::2], base.transpose(1, 2)):
        gamma = _gamma_between(view.contiguous(), 8, 0.5)
        keep, dist = iaf_local_select(view, gamma, block=8, backend=backend, return_distances=True)
        assert_matches_reference(view.contiguous(), gamma, 8, keep, dist)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_real_mri_volume(backend, dtype):
    volume = _real_volume().to(dtype)
    if backend == "triton" and DEVICE.type == "cpu":
        volume = volume[:, ::4, ::4]  # the interpreter is slow; the slices stay real anatomy
    volume = volume.contiguous().to(DEVICE)
    rows, cols = volume.shape[1] // 4, volume.shape[2] // 4
    tiled = volume.reshape(-1, 4, rows, 4, cols).permute(0, 1, 3, 2, 4).reshape(volume.shape[0], -1)
    for gamma in (0.02, 0.1, 0.4):
        keep, dist = iaf_local_select(volume, gamma, block=(rows, cols), backend=backend, return_distances=True)
        assert_matches_reference(tiled, gamma, rows * cols, keep, dist)


@pytest.mark.skipif("cpp" not in BACKENDS, reason="needs the compiled extension")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.uint8], ids=str)
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("blocks", [2, 7, 64])
def test_cpp_scan_splits_wide_slices_across_threads(dtype, threads, blocks):
    # From 32768 values a slice one volume's scan runs on all threads, each owning a range of blocks
    # (7 blocks over 3 threads: unequal ranges; 2 blocks: a thread without any).
    block = 33000 // blocks
    volume = _random_volume((30, blocks * block), dtype, drift=0.05)
    gamma = _gamma_between(volume, block, 0.5)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        keep, dist = iaf_local_select(volume, gamma, block=block, backend="cpp", return_distances=True)
        if dtype.is_floating_point:
            poisoned = volume.clone()
            poisoned[17, 5] = float("nan")
            with pytest.raises(ValueError, match="NaN or Inf"):
                iaf_local_select(poisoned, gamma, block=block, backend="cpp")
    finally:
        torch.set_num_threads(previous)
    assert_matches_reference(volume, gamma, block, keep, dist)


@pytest.mark.parametrize("backend", BACKENDS)
def test_negative_gamma_keeps_every_slice(backend):
    volume = _random_volume((20, 3, 4), torch.float32).to(DEVICE)
    assert bool(iaf_local_select(volume, -0.5, block=4, backend=backend).all())


NON_FINITE_CASES = {
    "middle-slice": ((12, 4, 6), None, 7),
    "first-slice": ((12, 4, 6), None, 0),
    "last-slice": ((12, 4, 6), None, 11),
    "one-slice-volume": ((1, 4, 6), None, 0),
    "lone-slice-in-varlen": ((9, 4, 6), [0, 4, 5, 9], 4),
    "past-the-band": ((30, 4, 6), None, 29),
}


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(NON_FINITE_CASES))
def test_non_finite_volume_is_rejected(case, backend, dtype, value):
    shape, offsets, row = NON_FINITE_CASES[case]
    volume = torch.rand(shape, dtype=torch.float64)
    volume[row, 1, 3] = value
    cu = None if offsets is None else torch.tensor(offsets, dtype=torch.int32, device=DEVICE)
    # gamma 2 keeps nothing past slice 0: slice 29 is compared with slice 0, outside the Triton band.
    with pytest.raises(ValueError, match="iaf_local_select: volume contains NaN or Inf"):
        iaf_local_select(volume.to(dtype).to(DEVICE), 2.0, block=6, cu_seqlens=cu, backend=backend)


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: iaf_local_select(torch.rand(4, 6), 0.1, block=4), ValueError, "block=4 must be >= 1 and divide"),
        (lambda: iaf_local_select(torch.rand(4, 6), 0.1, block=0), ValueError, "block=0"),
        (lambda: iaf_local_select(torch.rand(4, 6), 0.1, block=True), TypeError, "block must be"),
        (lambda: iaf_local_select(torch.rand(4, 6), 0.1, block=2.0), TypeError, "block must be"),
        (lambda: iaf_local_select(torch.rand(4, 6, 6), 0.1, block=(2,)), ValueError, "one size per slice dim"),
        (lambda: iaf_local_select(torch.rand(4, 6, 6), 0.1, block=(4, 2)), ValueError, "each dividing"),
        (lambda: iaf_local_select(torch.rand(4), 0.1, block=1), ValueError, "slice dims"),
        (lambda: iaf_local_select(torch.rand(4, 6).int(), 0.1, block=2), TypeError, "dtype"),
        (lambda: iaf_local_select([[1.0]], 0.1, block=1), TypeError, "volume must be a torch.Tensor"),
        (lambda: iaf_local_select(torch.rand(4, 6), float("nan"), block=2), ValueError, "gamma"),
        (lambda: iaf_local_select(torch.rand(4, 6), 0.1, block=2, backend="gpu"), ValueError, "backend"),
        (lambda: iaf_local_select(torch.rand(4, 6), 0.1, block=2,
                                  cu_seqlens=torch.tensor([0, 3], dtype=torch.int32)), ValueError, "cu_seqlens"),
    ],
)  # fmt: skip
def test_bad_input_is_rejected_with_the_argument_named(make, error, match):
    with pytest.raises(error, match=match):
        make()


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    """One registered op whose last argument names the backend; every backend passes every opcheck
    utility, with offsets (seqlen the longest volume) and without (volumes of seqlen rows each)."""
    slices = _random_volume((30, 24), torch.float32).to(DEVICE)
    cu = torch.tensor([0, 12, 30], dtype=torch.int32, device=DEVICE)
    for args in [(slices, cu, 18, 6, 0.2, backend), (slices, None, 15, 6, 0.2, backend)]:
        torch.library.opcheck(torch.ops.medpruner.iaf_local_select, args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    volume = _random_volume((40, 6, 6), torch.float32).to(DEVICE)
    gamma = _gamma_between(volume, 9, 0.7)

    def prune(v):
        return iaf_local_select(v, gamma, block=9, backend=backend, return_distances=True)

    compiled = torch.compile(prune, fullgraph=True, backend="eager" if DEVICE.type == "cpu" else "inductor")
    keep, dist = compiled(volume)
    eager_keep, eager_dist = prune(volume)
    assert torch.equal(keep, eager_keep)
    torch.testing.assert_close(dist, eager_dist)


# ------------------------------------------------------------- Triton path: bytes, launches, int64
needs_interpreter = pytest.mark.skipif(
    "triton" not in BACKENDS or DEVICE.type != "cpu", reason="counts loads in the Triton interpreter"
)


@needs_interpreter
@pytest.mark.parametrize("regime", ["many-keeps", "few-keeps"])
def test_triton_bytes_and_launches(monkeypatch, regime):
    """The band pass reads each block tile BAND + 1 times (the anchor and the BAND slices before it
    read it: L2 is meant to serve the repeats on a GPU); a stretch past the band adds the two slices of
    each of its distances."""
    depth, side = 120, 8
    if regime == "many-keeps":
        volume = _random_volume((depth, side, side), torch.float32)
        gamma = _gamma_between(volume, 16, 0.2)
    else:
        volume, gamma = _slow_drift_volume(depth, side, torch.float32), 0.9
    counter = _InterpreterCounter(monkeypatch)
    keep, dist = iaf_local_select(volume, gamma, block=16, backend="triton", return_distances=True)
    assert_matches_reference(volume, gamma, 16, keep, dist)
    assert counter.launches == ["_local_band_kernel", "_local_scan_kernel"]
    slice_bytes = volume[0].numel() * volume.element_size()
    band_reads = sum(1 + min(local_module.BAND, depth - 1 - t) for t in range(depth))
    # Decisions at a lag past the band: slices a + BAND + 1 ..= b of each run from anchor a to the next
    # kept slice b (to the last slice after the last anchor).
    kept = keep.nonzero().flatten().tolist()
    beyond = sum(max(0, b - a - local_module.BAND) for a, b in zip(kept, kept[1:] + [depth - 1], strict=True))
    if regime == "many-keeps":
        assert beyond == 0
    else:
        assert beyond > depth // 3
    num_blocks = side * side // 16
    # Each band program reads its row's volume end (int64); the scan reads cu_seqlens' two ends and
    # one band entry (float32) per decision within the band.
    control = 8 * depth * num_blocks + 2 * 4 + 4 * (depth - 1 - beyond)
    assert counter.loaded_bytes == slice_bytes * (band_reads + 2 * beyond) + control


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32], ids=str)
def test_element_offsets_past_2_31(backend, dtype):
    # Slices 2**27 elements apart in one huge storage: the last rows start past element 2**31. Only the
    # pages the view touches are written or read (a few MB of real memory).
    depth, stride = 20, 1 << 27
    storage = torch.empty(stride * (depth - 1) + 16 * 16, dtype=dtype, device=DEVICE)
    view = storage.as_strided((depth, 16, 16), (stride, 16, 1))
    assert view.storage_offset() + (depth - 1) * stride > 2**31
    values = _random_volume((depth, 16, 16), dtype)
    view.copy_(values.to(DEVICE))
    # gamma < 0 keeps every slice; a gamma past every distance forces the scan's direct path.
    for gamma in (-1.0, _gamma_between(values, 32, 0.5), 1e9):
        keep, dist = iaf_local_select(view, gamma, block=32, backend=backend, return_distances=True)
        assert_matches_reference(values, gamma, 32, keep, dist)
