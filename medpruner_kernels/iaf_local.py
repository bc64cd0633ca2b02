"""Local-change IAF: keep a slice when the mean absolute change of *any block* exceeds ``gamma_local``,
compared with the current anchor slice; a kept slice becomes the new anchor.

Plain IAF averages the change over the whole slice, so a small lesion that appears in one slice moves
the mean very little and the slice is dropped. Here the distance is the largest mean over blocks (an
encoder's merged patch, in pixels), so a change confined to one block counts in full.

Backends:

* ``triton``: two launches whatever the slice count. (1) band: one program per (slice t, block b)
  sums |x[t + g] - x[t]| over the block for the BAND next slices of t's volume and folds each block
  mean into ``band[t, g - 1]`` with an atomic max (exact and order-free: the max of non-negative
  floats). Consecutive programs are consecutive slices of one block, so the BAND + 1 reads of each
  block tile are meant to hit L2 (the interpreter counts them all: <= BAND + 1 times the volume).
  (2) scan: one program per volume walks the rule; while the anchor is at most BAND slices behind,
  the distance is a band entry; a longer stretch (few keeps) computes d(anchor, s) from the two
  slices itself (2 slice reads per such step, serial). NaN/Inf is flagged per slice by the band pass.
* ``cpp``: ``medpruner_kernels._C.iaf_local_select`` (csrc/iaf_local.cpp), OpenMP over volumes or
  over the blocks of one comparison, float sums per block lane, double across lanes.
* ``torch``: the rule vectorised over volumes, one step per slice position, anchors kept on the
  device (no host sync).
"""

from __future__ import annotations

import math

import torch

from medpruner_kernels._dispatch import _C, TRITON_AVAILABLE, call_op, resolve_backend
from medpruner_kernels._validation import VOLUME_DTYPES, check_gamma
from medpruner_kernels.iaf import _as_rows, _check_finite_volume, _offsets

BAND = 8  # next slices whose distances the band pass stores per slice
CHUNK = 256  # block columns a band program loads per step, for each of the BAND + 1 slices

if TRITON_AVAILABLE:
    import triton
    import triton.language as tl

    @triton.jit
    def _local_band_kernel(
        x_ptr,
        row_end_ptr,
        band_ptr,
        flags_ptr,
        row_stride,
        block_len,
        BAND: tl.constexpr,
        CHUNK: tl.constexpr,
    ):
        t = tl.program_id(0).to(tl.int64)
        b = tl.program_id(1).to(tl.int64)
        end = tl.load(row_end_ptr + t).to(tl.int64)
        lags = tl.arange(0, BAND).to(tl.int64) + 1
        later = t + lags
        has_pair = later < end
        cols = tl.arange(0, CHUNK)
        # Offsets in int64: a row stride times the slice index passes 2**31 in large volumes.
        base = x_ptr + b * block_len
        anchor_row = base + t * row_stride
        later_rows = base + later[:, None] * row_stride
        acc = tl.zeros([BAND, CHUNK], dtype=tl.float32)
        for c in range(0, block_len, CHUNK):
            in_block = (c + cols) < block_len
            anchor = tl.load(anchor_row + c + cols, mask=in_block, other=0).to(tl.float32)
            rows = tl.load(later_rows + c + cols[None, :], mask=has_pair[:, None] & in_block[None, :], other=0)
            acc += tl.abs(rows.to(tl.float32) - anchor[None, :])
        mean = tl.sum(acc, axis=1) / block_len
        # x * 0 is NaN exactly for NaN/Inf; an infinite mean is an overflowing difference.
        bad = (mean != mean) | (mean == float("inf"))
        tl.atomic_max(band_ptr + t * BAND + lags - 1, tl.where(bad, 0.0, mean), mask=has_pair)
        tl.store(flags_ptr + t + tl.zeros([BAND], dtype=tl.int64), tl.full([BAND], 1, tl.int8), mask=has_pair & bad)

    @triton.jit
    def _local_direct(x_ptr, anchor, s, row_stride, num_blocks, block_len, CHUNK: tl.constexpr):
        """max over blocks of mean |x[s] - x[anchor]|, by one program (the few-keeps path)."""
        cols = tl.arange(0, CHUNK)
        largest = 0.0
        for b in range(0, num_blocks):
            a_row = x_ptr + anchor * row_stride + b * block_len
            s_row = x_ptr + s * row_stride + b * block_len
            acc = tl.zeros([CHUNK], dtype=tl.float32)
            for c in range(0, block_len, CHUNK):
                in_block = (c + cols) < block_len
                a = tl.load(a_row + c + cols, mask=in_block, other=0).to(tl.float32)
                v = tl.load(s_row + c + cols, mask=in_block, other=0).to(tl.float32)
                acc += tl.abs(v - a)
            mean = tl.sum(acc, axis=0) / block_len
            # NaN poisons the max (the band pass flags it; here it must not be dropped either).
            largest = tl.where(mean != mean, mean, tl.maximum(largest, mean))
        return largest

    @triton.jit
    def _local_scan_kernel(
        x_ptr,
        band_ptr,
        cu_ptr,
        keep_ptr,
        dist_ptr,
        row_stride,
        num_blocks,
        block_len,
        gamma,
        BAND: tl.constexpr,
        CHUNK: tl.constexpr,
    ):
        v = tl.program_id(0)
        start = tl.load(cu_ptr + v).to(tl.int64)
        end = tl.load(cu_ptr + v + 1).to(tl.int64)
        tl.store(keep_ptr + start, 1, mask=start < end)
        tl.store(dist_ptr + start, 0.0, mask=start < end)
        anchor = start
        for step in range(start + 1, end):
            # The loop index may be an int32 or a Python int (the interpreter's): offsets must be int64.
            s = start * 0 + step
            lag = s - anchor
            if lag <= BAND:
                d = tl.load(band_ptr + anchor * BAND + lag - 1)
            else:
                d = _local_direct(x_ptr, anchor, s, row_stride, num_blocks, block_len, CHUNK)
            kept = d > gamma
            tl.store(keep_ptr + s, kept.to(tl.int8))
            tl.store(dist_ptr + s, d)
            anchor = tl.where(kept, s, anchor)


def _row_ends(cu: torch.Tensor, rows: int) -> torch.Tensor:
    """int64 ``[rows]``: the end row of each row's volume (sync-free)."""
    ends = cu[1:].to(torch.int64)
    volume = torch.searchsorted(ends, torch.arange(rows, device=cu.device), right=True)
    return ends[volume.clamp(max=ends.numel() - 1)]


def _launch_local(slices: torch.Tensor, cu: torch.Tensor, block: int, gamma: float):
    rows, cols = slices.shape
    device = slices.device
    num_blocks = cols // block
    band = torch.zeros(rows, BAND, dtype=torch.float32, device=device)
    flags = torch.zeros(rows, dtype=torch.int8, device=device)
    keep = torch.zeros(rows, dtype=torch.int8, device=device)
    dist = torch.zeros(rows, dtype=torch.float32, device=device)
    _local_band_kernel[(rows, num_blocks)](
        slices, _row_ends(cu, rows), band, flags, slices.stride(0), block, BAND=BAND, CHUNK=CHUNK, num_warps=4
    )
    _local_scan_kernel[(cu.numel() - 1,)](
        slices,
        band,
        cu,
        keep,
        dist,
        slices.stride(0),
        num_blocks,
        block,
        gamma,
        BAND=BAND,
        CHUNK=CHUNK,
        num_warps=1,
    )
    # A flagged slice poisons its distance, so the one finite-check below sees it.
    dist = torch.where(flags.bool(), torch.full_like(dist, float("nan")), dist)
    return keep.bool(), dist


def _torch_local(slices: torch.Tensor, cu: torch.Tensor, block: int, gamma: float, max_len: int):
    """The rule vectorised over volumes: step ``s`` compares every volume's slice s with its anchor
    (rows past a volume's end go to a sink row and are masked out); anchors stay on the device."""
    rows, cols = slices.shape
    device = slices.device
    starts = cu[:-1].to(torch.int64)
    lengths = cu[1:].to(torch.int64) - starts
    keep = torch.zeros(rows + 1, dtype=torch.bool, device=device)
    dist = torch.zeros(rows + 1, dtype=torch.float32, device=device)
    sink = torch.full_like(starts, rows)
    keep.index_fill_(0, torch.where(lengths > 0, starts, sink), True)
    last_row = max(rows - 1, 0)
    anchor = starts.clamp(max=last_row)
    for step in range(1, max_len):
        live = lengths > step
        row = torch.where(live, starts + step, sink)
        current = slices.index_select(0, row.clamp(max=last_row)).float()
        reference = slices.index_select(0, anchor).float()
        d = current.sub_(reference).abs_().view(-1, cols // block, block).mean(dim=2)
        # amax drops nothing: a NaN block mean makes the slice's distance NaN.
        d = torch.where(d.isnan().any(dim=1), float("nan"), d.amax(dim=1))
        hit = live & (d > gamma)
        dist.index_put_((row,), torch.where(live, d, 0.0))
        keep.index_put_((row,), hit | keep[row])
        anchor = torch.where(hit, row, anchor)
    return keep[:rows].clone(), dist[:rows].clone()


# ------------------------------------------------------------------------------------ registered ops
# One op; every backend's kernel takes the [rows, cols] slices, int32 offsets or None (volumes of
# ``seqlen`` rows each; with offsets ``seqlen`` is the longest), the block length and gamma.
def _iaf_local_select_triton(slices, cu_seqlens, seqlen, block, gamma):
    return _launch_local(slices, _offsets(cu_seqlens, slices.shape[0], seqlen, slices.device), block, gamma)


def _iaf_local_select_cpp(slices, cu_seqlens, seqlen, block, gamma):
    return _C.iaf_local_select(slices, cu_seqlens, seqlen, block, gamma)


def _iaf_local_select_torch(slices, cu_seqlens, seqlen, block, gamma):
    cu = _offsets(cu_seqlens, slices.shape[0], seqlen, slices.device)
    return _torch_local(slices, cu, block, gamma, seqlen)


_KERNELS = {"triton": _iaf_local_select_triton, "cpp": _iaf_local_select_cpp, "torch": _iaf_local_select_torch}


@torch.library.custom_op("medpruner::iaf_local_select", mutates_args=())
def _iaf_local_select_op(
    slices: torch.Tensor, cu_seqlens: torch.Tensor | None, seqlen: int, block: int, gamma: float, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    return _KERNELS[backend](slices, cu_seqlens, seqlen, block, gamma)


@_iaf_local_select_op.register_fake
def _(slices, cu_seqlens, seqlen, block, gamma, backend):
    rows = slices.shape[0]
    return slices.new_empty(rows, dtype=torch.bool), slices.new_empty(rows, dtype=torch.float32)


# ------------------------------------------------------------------------------------------ public
def _block_layout(op: str, volume: torch.Tensor, block, batched: bool) -> tuple[torch.Tensor, int]:
    """(volume with each block contiguous in its flattened slice, elements per block).

    An int block is a run of that many contiguous elements of the flattened slice (the layout of
    Qwen-VL's pixel rows, where a merged patch is contiguous). A tuple tiles the slice dims: it must
    have one size per slice dim, each dividing its dim, and the slices are reordered (one copy) so
    that every tile is contiguous."""
    lead = 2 if batched else 1
    slice_shape = tuple(volume.shape[lead:])
    if isinstance(block, bool):
        raise TypeError(f"{op}: block must be an int or a tuple of ints, got {block!r}")
    if isinstance(block, int):
        size = math.prod(slice_shape)
        if block < 1 or (size and size % block):
            raise ValueError(f"{op}: block={block} must be >= 1 and divide the slice size {size}")
        return volume, block
    if not isinstance(block, (tuple, list)) or not all(isinstance(b, int) and not isinstance(b, bool) for b in block):
        raise TypeError(f"{op}: block must be an int or a tuple of ints, got {block!r}")
    if len(block) != len(slice_shape) or any(b < 1 or dim % b for b, dim in zip(block, slice_shape, strict=True)):
        raise ValueError(
            f"{op}: block={tuple(block)} must give one size per slice dim, each dividing it (slice shape {slice_shape})"
        )
    split = [n for dim, b in zip(slice_shape, block, strict=True) for n in (dim // b, b)]
    tiled = volume.reshape(*volume.shape[:lead], *split)
    dims = len(slice_shape)
    order = list(range(lead)) + [lead + 2 * i for i in range(dims)] + [lead + 2 * i + 1 for i in range(dims)]
    return tiled.permute(order).reshape(volume.shape), math.prod(block)


def iaf_local_select(
    volume: torch.Tensor,
    gamma_local: float,
    *,
    block,
    cu_seqlens: torch.Tensor | None = None,
    batched: bool = False,
    max_seqlen: int | None = None,
    return_distances: bool = False,
    backend: str = "auto",
):
    """Local-change IAF: which slices to keep when a change confined to one block must count.

    Args:
        volume: as in :func:`medpruner_kernels.iaf_select`: ``[D, *slice_shape]``, ``[B, D,
            *slice_shape]`` with ``batched=True``, or ``[total_slices, *slice_shape]`` with
            ``cu_seqlens``. dtype float32, float16, bfloat16, float64, uint8 or int16; any strides.
        gamma_local: threshold on a block's mean absolute difference, in the volume's units. A
            negative value keeps every slice.
        block: an int, a run of that many contiguous elements of the flattened slice (Qwen-VL pixel
            rows: one merged patch is ``merge**2 * channels * temporal * patch**2`` contiguous values);
            or a tuple with one size per slice dim (``(16, 16)`` for ``[D, H, W]``), each dividing its
            dim: the slice is cut into those tiles (a reordering copy).
        cu_seqlens, batched, max_seqlen, return_distances, backend: as in ``iaf_select``.

    Returns:
        keep: bool of the mask shape of ``iaf_select``; with ``return_distances``, also the float32
        distance of each slice to the anchor it was compared with (0 for a volume's first slice).

    Math, per volume: keep[0] = True, anchor = 0; for s = 1..D-1,
    d = max over blocks k of mean_{j in k} |x[s, j] - x[anchor, j]| (float32 sums); if
    d > gamma_local: keep[s] = True and anchor = s. With one block per slice this is ``iaf_select``.

    Raises:
        TypeError / ValueError naming the argument (dtype, rank, empty volume, bad ``cu_seqlens``,
        a block that does not tile the slice, NaN ``gamma_local``) before any kernel runs; NaN/Inf in
        the volume as ``iaf_select`` does (on CUDA deferred to the request's host read).
    """
    op = "iaf_local_select"
    gamma = check_gamma(op, gamma_local)
    if not isinstance(volume, torch.Tensor):
        raise TypeError(f"{op}: volume must be a torch.Tensor, got {type(volume).__name__}")
    if volume.dtype not in VOLUME_DTYPES:
        raise TypeError(f"{op}: volume dtype {volume.dtype} is not supported; use one of {VOLUME_DTYPES}")
    lead = 2 if batched else 1
    if volume.dim() <= lead:
        raise ValueError(f"{op}: volume must have slice dims after the first {lead}, got shape {tuple(volume.shape)}")
    volume, block_len = _block_layout(op, volume, block, batched)
    slices, cu, max_len, mask_shape = _as_rows(op, volume, cu_seqlens, batched, max_seqlen)
    rows = slices.shape[0]
    chosen = resolve_backend(op, volume.device, backend, cpp_ops=("iaf_local_select",))
    if rows == 0:
        keep = torch.zeros(0, dtype=torch.bool, device=volume.device)
        dist = torch.zeros(0, dtype=torch.float32, device=volume.device)
    elif chosen == "cpp":  # the compiled kernel raises on NaN/Inf itself
        keep, dist = call_op(_iaf_local_select_op, _KERNELS, chosen, slices, cu, max_len, block_len, gamma)
    else:
        cu = _offsets(cu, rows, max_len, volume.device)
        keep, dist = call_op(_iaf_local_select_op, _KERNELS, chosen, slices, cu, max_len, block_len, gamma)
        _check_finite_volume(op, slices, cu, dist)
    if keep.shape != mask_shape:
        keep = keep.reshape(mask_shape)
    if return_distances:
        return keep, dist.reshape(mask_shape)
    return keep


__all__ = ["iaf_local_select"]
