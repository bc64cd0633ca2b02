"""IAF, inter-slice anchor filtering: keep a slice when its mean absolute distance to the current
anchor slice exceeds gamma; a kept slice becomes the new anchor.

The rule is sequential (each decision moves the anchor), so the GPU path splits it into parallel
distance passes and one small scan program per volume:

1. band pass (1 launch, every slice read once from HBM; the lags are L1/L2 hits): the partial sums
   of |x[s] - x[s - g]| for g = 1..BAND over column tiles, ``band_part[s, g - 1, tile]``.
2. scan (1 launch, one program per volume): from the anchor a, the distances to a+1..a+BAND sit in
   the band, so the program jumps straight to the first one above gamma. A stretch longer than BAND
   with no keep needs distances to an older anchor: the program records a row request and stops.
3. rounds (a fixed number, 2 launches each, no host sync): a row pass computes the partial sums of
   |x[s] - x[a]| for the ROW_LEN slices after the request, then the scan resumes. Each round moves the
   scan at least BAND + 1 slices forward, so ceil(max_len / (BAND + 1)) rounds always finish; rounds
   whose volume is done exit at once.

Bytes: the volume once (band) plus, in the few-keeps regime, at most once more (rows never overlap:
each covers slices after the previous one). Launches: 2 + 2 * ceil(max_len / (BAND + 1)).
"""

from __future__ import annotations

import math

import torch

from medpruner_kernels._dispatch import _C, TRITON_AVAILABLE, is_traced, resolve_backend
from medpruner_kernels._validation import (
    VOLUME_DTYPES,
    check_cu_seqlens,
    check_gamma,
    check_or_defer,
    check_tensor,
)

BAND = 16
ROW_LEN = 32
BLOCK_P = 256
MAX_TILES = 64

if TRITON_AVAILABLE:
    import triton
    import triton.language as tl

    @triton.jit
    def _iaf_band_kernel(
        x_ptr,
        band_part_ptr,
        row_stride,
        num_rows,
        num_cols,
        tile_cols,
        num_tiles,
        ROWS_PER_PROGRAM: tl.constexpr,
        BAND: tl.constexpr,
        BLOCK_P: tl.constexpr,
    ):
        chunk = tl.program_id(0)
        tile = tl.program_id(1)
        lags = tl.arange(0, BAND) + 1
        col_begin = tile * tile_cols
        col_end = tl.minimum(col_begin + tile_cols, num_cols)
        for i in range(ROWS_PER_PROGRAM):
            s = chunk * ROWS_PER_PROGRAM + i
            # Scalar conditions are folded into vector bounds: the interpreter rejects vector & scalar masks.
            row_col_end = tl.where(s < num_rows, col_end, col_begin)
            prev_rows = s - lags
            prev_ok = (prev_rows >= 0) & (prev_rows + lags < num_rows)
            part = tl.zeros([BAND], dtype=tl.float32)
            for col0 in range(col_begin, col_end, BLOCK_P):
                cols = col0 + tl.arange(0, BLOCK_P)
                col_ok = cols < col_end
                cur = tl.load(x_ptr + s.to(tl.int64) * row_stride + cols, mask=cols < row_col_end, other=0)
                prev = tl.load(
                    x_ptr + prev_rows.to(tl.int64)[:, None] * row_stride + cols[None, :],
                    mask=prev_ok[:, None] & col_ok[None, :],
                    other=0,
                )
                part += tl.sum(tl.abs(prev.to(tl.float32) - cur.to(tl.float32)[None, :]), axis=1)
            tl.store(band_part_ptr + (s * BAND + lags - 1) * num_tiles + tile, part, mask=prev_ok)

    @triton.jit
    def _iaf_row_kernel(
        x_ptr,
        row_part_ptr,
        state_ptr,
        cu_ptr,
        row_stride,
        num_cols,
        tile_cols,
        num_tiles,
        ROW_LEN: tl.constexpr,
        BLOCK_P: tl.constexpr,
    ):
        volume = tl.program_id(0)
        tile = tl.program_id(1)
        end = tl.load(cu_ptr + volume + 1)
        anchor = tl.load(state_ptr + volume * 4 + 0)
        pos = tl.load(state_ptr + volume * 4 + 1)
        row_anchor = tl.load(state_ptr + volume * 4 + 2)
        row_start = tl.load(state_ptr + volume * 4 + 3)
        requested = (pos < end) & (row_anchor == anchor) & (row_start == pos)
        offsets = tl.arange(0, ROW_LEN)
        rows = row_start + offsets
        rows_ok = rows < tl.where(requested, end, row_start)
        col_begin = tile * tile_cols
        col_end = tl.minimum(col_begin + tile_cols, num_cols)
        ref_col_end = tl.where(requested, col_end, col_begin)
        part = tl.zeros([ROW_LEN], dtype=tl.float32)
        for col0 in range(col_begin, col_end, BLOCK_P):
            cols = col0 + tl.arange(0, BLOCK_P)
            col_ok = cols < col_end
            ref = tl.load(x_ptr + anchor.to(tl.int64) * row_stride + cols, mask=cols < ref_col_end, other=0)
            cur = tl.load(
                x_ptr + rows.to(tl.int64)[:, None] * row_stride + cols[None, :],
                mask=rows_ok[:, None] & col_ok[None, :],
                other=0,
            )
            part += tl.sum(tl.abs(cur.to(tl.float32) - ref.to(tl.float32)[None, :]), axis=1)
        tl.store(row_part_ptr + (volume * ROW_LEN + offsets) * num_tiles + tile, part, mask=rows_ok)

    @triton.jit
    def _iaf_scan_kernel(
        band_part_ptr,
        row_part_ptr,
        state_ptr,
        cu_ptr,
        keep_ptr,
        dist_ptr,
        gamma,
        inv_cols,
        num_tiles,
        FIRST: tl.constexpr,
        BAND: tl.constexpr,
        ROW_LEN: tl.constexpr,
        TILES: tl.constexpr,
    ):
        volume = tl.program_id(0)
        start = tl.load(cu_ptr + volume)
        end = tl.load(cu_ptr + volume + 1)
        if FIRST:
            anchor = start
            pos = start + 1
            row_anchor = start - 1
            row_start = start
            tl.store(keep_ptr + start, 1, mask=end > start)
        else:
            anchor = tl.load(state_ptr + volume * 4 + 0)
            pos = tl.load(state_ptr + volume * 4 + 1)
            row_anchor = tl.load(state_ptr + volume * 4 + 2)
            row_start = tl.load(state_ptr + volume * 4 + 3)
        lags = tl.arange(0, BAND) + 1
        offsets = tl.arange(0, ROW_LEN)
        tiles = tl.arange(0, TILES)
        tile_ok = tiles < num_tiles
        active = pos < end
        while active:
            gap = pos - anchor
            if gap <= BAND:
                targets = anchor + lags
                ok = (lags >= gap) & (targets < end)
                part = tl.load(
                    band_part_ptr + ((targets * BAND + lags - 1) * num_tiles)[:, None] + tiles[None, :],
                    mask=ok[:, None] & tile_ok[None, :],
                    other=0.0,
                )
                d = tl.sum(part, axis=1) * inv_cols
                first = tl.min(tl.where(ok & (d > gamma), lags, BAND + 1), axis=0)
                tl.store(dist_ptr + targets, d, mask=ok & (lags <= first))
                if first <= BAND:
                    tl.store(keep_ptr + anchor + first, 1)
                    anchor = anchor + first
                    pos = anchor + 1
                else:
                    pos = anchor + BAND + 1
            else:
                if (row_anchor == anchor) & (pos >= row_start) & (pos < row_start + ROW_LEN):
                    targets = row_start + offsets
                    ok = (targets >= pos) & (targets < end)
                    part = tl.load(
                        row_part_ptr + ((volume * ROW_LEN + offsets) * num_tiles)[:, None] + tiles[None, :],
                        mask=ok[:, None] & tile_ok[None, :],
                        other=0.0,
                    )
                    d = tl.sum(part, axis=1) * inv_cols
                    first = tl.min(tl.where(ok & (d > gamma), offsets, ROW_LEN), axis=0)
                    tl.store(dist_ptr + targets, d, mask=ok & (offsets <= first))
                    if first < ROW_LEN:
                        tl.store(keep_ptr + row_start + first, 1)
                        anchor = row_start + first
                        pos = anchor + 1
                    else:
                        pos = row_start + ROW_LEN
                else:
                    row_anchor = anchor
                    row_start = pos
                    active = False
            active = active & (pos < end)
        tl.store(state_ptr + volume * 4 + 0, anchor)
        tl.store(state_ptr + volume * 4 + 1, pos)
        tl.store(state_ptr + volume * 4 + 2, row_anchor)
        tl.store(state_ptr + volume * 4 + 3, row_start)

    @triton.jit
    def _pair_distance_kernel(
        x_ptr,
        anchor_ptr,
        part_ptr,
        row_stride,
        num_cols,
        tile_cols,
        num_tiles,
        BLOCK_P: tl.constexpr,
    ):
        s = tl.program_id(0)
        tile = tl.program_id(1)
        anchor = tl.load(anchor_ptr + s)
        col_begin = tile * tile_cols
        col_end = tl.minimum(col_begin + tile_cols, num_cols)
        part = tl.zeros([BLOCK_P], dtype=tl.float32)
        for col0 in range(col_begin, col_end, BLOCK_P):
            cols = col0 + tl.arange(0, BLOCK_P)
            col_ok = cols < col_end
            cur = tl.load(x_ptr + s.to(tl.int64) * row_stride + cols, mask=col_ok, other=0)
            ref = tl.load(x_ptr + anchor.to(tl.int64) * row_stride + cols, mask=col_ok, other=0)
            part += tl.abs(cur.to(tl.float32) - ref.to(tl.float32))
        tl.store(part_ptr + s * num_tiles + tile, tl.sum(part, axis=0))


# ------------------------------------------------------------------------------------------ launchers
def _tiling(num_cols: int) -> tuple[int, int]:
    """Column tiles of the distance passes: at most MAX_TILES partial sums per distance (the scan adds
    them in one vector load), each tile a multiple of BLOCK_P."""
    tiles = max(1, min(MAX_TILES, triton.cdiv(num_cols, BLOCK_P)))
    tile_cols = triton.cdiv(triton.cdiv(num_cols, tiles), BLOCK_P) * BLOCK_P
    return tile_cols, triton.cdiv(num_cols, tile_cols)


def _num_rounds(max_len: int) -> int:
    # Until it finishes, the scan has passed (r + 1) * (BAND + 1) slices after r rounds.
    return max(0, math.ceil(max_len / (BAND + 1)) - 1)


def _launch_iaf(slices, cu_seqlens, gamma, max_len):
    rows, cols = slices.shape
    segments = cu_seqlens.numel() - 1
    tile_cols, num_tiles = _tiling(cols)
    tiles_block = triton.next_power_of_2(num_tiles)
    device = slices.device
    keep = torch.zeros(rows, dtype=torch.int8, device=device)
    dist = torch.zeros(rows, dtype=torch.float32, device=device)
    band_part = torch.empty(max(rows, 1) * BAND * num_tiles, dtype=torch.float32, device=device)
    row_part = torch.empty(segments * ROW_LEN * num_tiles, dtype=torch.float32, device=device)
    state = torch.empty(segments * 4, dtype=torch.int32, device=device)
    rows_per_program = 4
    wrap_triton(_iaf_band_kernel)[(triton.cdiv(rows, rows_per_program), num_tiles)](
        slices, band_part, slices.stride(0), rows, cols, tile_cols, num_tiles,
        ROWS_PER_PROGRAM=rows_per_program, BAND=BAND, BLOCK_P=BLOCK_P,
    )  # fmt: skip
    scan_args = (band_part, row_part, state, cu_seqlens, keep, dist, gamma, 1.0 / cols, num_tiles)
    wrap_triton(_iaf_scan_kernel)[(segments,)](
        *scan_args, FIRST=True, BAND=BAND, ROW_LEN=ROW_LEN, TILES=tiles_block
    )
    for _ in range(_num_rounds(max_len)):
        wrap_triton(_iaf_row_kernel)[(segments, num_tiles)](
            slices, row_part, state, cu_seqlens, slices.stride(0), cols, tile_cols, num_tiles,
            ROW_LEN=ROW_LEN, BLOCK_P=BLOCK_P,
        )  # fmt: skip
        wrap_triton(_iaf_scan_kernel)[(segments,)](
            *scan_args, FIRST=False, BAND=BAND, ROW_LEN=ROW_LEN, TILES=tiles_block
        )
    return keep.bool(), dist


def _launch_pair_distances(slices, anchor):
    rows, cols = slices.shape
    tile_cols, num_tiles = _tiling(cols)
    part = torch.empty(rows, num_tiles, dtype=torch.float32, device=slices.device)
    wrap_triton(_pair_distance_kernel)[(rows, num_tiles)](
        slices, anchor, part, slices.stride(0), cols, tile_cols, num_tiles, BLOCK_P=BLOCK_P
    )
    return part.sum(dim=1) / cols


# -------------------------------------------------------------------------------------- torch path
def _torch_pair_distances(slices: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    # Chunked so the float32 difference never costs more than ~64 MiB at once.
    rows, cols = slices.shape
    out = torch.empty(rows, dtype=torch.float32, device=slices.device)
    chunk = max(1, (16 << 20) // max(cols, 1))
    for begin in range(0, rows, chunk):
        cur = slices[begin : begin + chunk].to(torch.float32)
        ref = slices.index_select(0, anchor[begin : begin + chunk]).to(torch.float32)
        out[begin : begin + chunk] = (cur - ref).abs().mean(dim=1)
    return out


def _torch_iaf(slices: torch.Tensor, cu_seqlens: torch.Tensor, gamma: float, max_len: int):
    """The per-slice loop, vectorised over volumes, with the anchor kept on the device: no host sync.
    Volume b's s-th slice is row cu[b] + s; rows past a volume's end are masked out."""
    rows = slices.shape[0]
    device = slices.device
    starts = cu_seqlens[:-1].to(torch.int64)
    lengths = cu_seqlens[1:].to(torch.int64) - starts
    keep = torch.zeros(rows + 1, dtype=torch.bool, device=device)
    dist = torch.zeros(rows + 1, dtype=torch.float32, device=device)
    sink = torch.full_like(starts, rows)
    keep.index_fill_(0, torch.where(lengths > 0, starts, sink), True)
    anchor = starts.clone()
    padded = torch.cat([slices, slices[:1]]) if rows else slices
    for step in range(1, max_len):
        live = lengths > step
        current = torch.where(live, starts + step, sink)
        safe_anchor = torch.where(live, anchor, sink)
        d = (padded[current].to(torch.float32) - padded[safe_anchor].to(torch.float32)).abs().mean(dim=1)
        hit = live & (d > gamma)
        dist.index_put_((current,), torch.where(live, d, 0.0))
        keep.index_put_((current,), hit | keep[current])
        anchor = torch.where(hit, current, anchor)
    return keep[:rows].clone(), dist[:rows].clone()


# ------------------------------------------------------------------------------------ registered ops
if TRITON_AVAILABLE:
    from torch.library import triton_op, wrap_triton

    @triton_op("medpruner::iaf_select_triton", mutates_args=())
    def _iaf_select_triton(
        slices: torch.Tensor, cu_seqlens: torch.Tensor, gamma: float, max_len: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return _launch_iaf(slices, cu_seqlens, gamma, max_len)

    @triton_op("medpruner::anchor_distances_triton", mutates_args=())
    def _anchor_distances_triton(slices: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
        return _launch_pair_distances(slices, anchor)


@torch.library.custom_op("medpruner::iaf_select_cpp", mutates_args=())
def _iaf_select_cpp(
    slices: torch.Tensor, cu_seqlens: torch.Tensor | None, seqlen: int, gamma: float
) -> tuple[torch.Tensor, torch.Tensor]:
    return _C.iaf_select(slices, cu_seqlens, seqlen, gamma)


@torch.library.custom_op("medpruner::anchor_distances_cpp", mutates_args=())
def _anchor_distances_cpp(slices: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    return _C.anchor_distances(slices, anchor)


@torch.library.custom_op("medpruner::iaf_select_torch", mutates_args=())
def _iaf_select_torch(
    slices: torch.Tensor, cu_seqlens: torch.Tensor, gamma: float, max_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    return _torch_iaf(slices, cu_seqlens, gamma, max_len)


@torch.library.custom_op("medpruner::anchor_distances_torch", mutates_args=())
def _anchor_distances_torch(slices: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    return _torch_pair_distances(slices, anchor)


def _fake_keep_dist(slices, *args):
    rows = slices.shape[0]
    return slices.new_empty(rows, dtype=torch.bool), slices.new_empty(rows, dtype=torch.float32)


def _fake_dist(slices, anchor):
    return slices.new_empty(slices.shape[0], dtype=torch.float32)


for _op in (_iaf_select_cpp, _iaf_select_torch):
    _op.register_fake(_fake_keep_dist)
for _op in (_anchor_distances_cpp, _anchor_distances_torch):
    _op.register_fake(_fake_dist)


# ------------------------------------------------------------------------------------------ public
def _as_rows(op: str, volume, cu_seqlens, batched: bool, max_seqlen):
    """Validate ``volume`` and view it as ``[rows, cols]`` with unit column stride, plus int32
    offsets ``[B+1]``, the longest volume (a host-side bound, never read from the device) and the
    mask shape to return."""
    check_tensor(op, "volume", volume, VOLUME_DTYPES)
    if batched and cu_seqlens is not None:
        raise ValueError(f"{op}: pass either batched=True ([B, D, ...]) or cu_seqlens ([total, ...]), not both")
    min_rank = 3 if batched else 2
    if volume.dim() < min_rank:
        layout = "[B, D, *slice_shape]" if batched else "[D, *slice_shape]"
        raise ValueError(
            f"{op}: volume must be {layout} with a non-empty slice shape, got shape {tuple(volume.shape)}"
        )
    lead = 2 if batched else 1
    mask_shape = tuple(volume.shape[:lead])
    rows = math.prod(mask_shape)
    cols = math.prod(volume.shape[lead:])
    if cols == 0:
        raise ValueError(f"{op}: volume has empty slices (shape {tuple(volume.shape)})")
    if rows == 0 and cu_seqlens is None:
        raise ValueError(f"{op}: volume has no slices (shape {tuple(volume.shape)})")
    slices = volume.reshape(rows, cols)
    if cols > 1 and slices.stride(1) != 1:
        slices = slices.contiguous()
    device = volume.device
    if cu_seqlens is not None:
        cu = check_cu_seqlens(op, cu_seqlens, rows, device)
        if max_seqlen is None:
            # On CPU the offsets are at hand; on CUDA reading them would sync, so bound by the total.
            max_seqlen = int((cu[1:] - cu[:-1]).max()) if device.type == "cpu" else rows
        elif isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 0:
            raise ValueError(f"{op}: max_seqlen must be a non-negative int, got {max_seqlen!r}")
        return slices, cu, int(max_seqlen), mask_shape
    per_volume = volume.shape[1] if batched else volume.shape[0]
    return slices, None, per_volume, mask_shape


def _offsets(cu: torch.Tensor | None, rows: int, seqlen: int, device: torch.device) -> torch.Tensor:
    """``cu`` from :func:`_as_rows`, or the offsets of volumes of ``seqlen`` rows each when it is None
    (built only by the backends that need a tensor: the compiled kernel takes ``seqlen`` itself)."""
    if cu is not None:
        return cu
    return torch.arange(0, rows + 1, seqlen, dtype=torch.int32, device=device)


def iaf_select(
    volume: torch.Tensor,
    gamma: float,
    *,
    cu_seqlens: torch.Tensor | None = None,
    batched: bool = False,
    max_seqlen: int | None = None,
    return_distances: bool = False,
    backend: str = "auto",
):
    """Inter-slice anchor filtering: which slices of a volume to keep.

    Args:
        volume: ``[D, *slice_shape]`` (one volume; every dim after the first belongs to a slice, so
            ``[D, H, W]`` and ``[D, C, H, W]`` both work), ``[B, D, *slice_shape]`` with
            ``batched=True``, or a flat varlen batch ``[total_slices, *slice_shape]`` with
            ``cu_seqlens``. dtype float32, float16, bfloat16, float64, uint8 or int16; any strides.
        gamma: threshold on the mean absolute difference, in the volume's own units (the paper's 0.05
            is on the [-1, 1] scale of the models' processors). A negative gamma keeps every slice.
        cu_seqlens: int32 ``[B+1]`` offsets of the volumes in a flat batch (0, ..., total_slices).
        batched: treat the first two dims as ``[B, D]``.
        max_seqlen: longest volume of a varlen batch; on CUDA it bounds the number of scan rounds
            without reading ``cu_seqlens`` on the host (default: the total, which is always safe).
        return_distances: also return each slice's float32 distance to the anchor it was compared
            with (0 for a volume's first slice).
        backend: "auto" | "triton" | "cpp" | "torch".

    Returns:
        keep: bool, ``[D]``, ``[B, D]`` or ``[total_slices]``; and the distances when asked.

    Math, per volume: keep[0] = True, anchor = 0; for s = 1..D-1, d = mean|x[s] - x[anchor]|
    (float32 accumulation); if d > gamma: keep[s] = True and anchor = s.

    Raises:
        TypeError / ValueError naming the argument for a bad dtype, rank, empty volume, bad
        ``cu_seqlens`` or NaN gamma, before any kernel runs. NaN/Inf in the volume is detected in
        the same pass that computes the distances (no second read of the volume) and raised before
        anything is returned; on CUDA it is queued, sync-free, for
        :func:`medpruner_kernels.raise_pending_errors`.
    """
    op = "iaf_select"
    gamma = check_gamma(op, gamma)
    slices, cu, max_len, mask_shape = _as_rows(op, volume, cu_seqlens, batched, max_seqlen)
    rows = slices.shape[0]
    chosen = resolve_backend(op, volume.device, backend, cpp_ops=("iaf_select",))
    if rows == 0:
        keep = torch.zeros(0, dtype=torch.bool, device=volume.device)
        dist = torch.zeros(0, dtype=torch.float32, device=volume.device)
    elif chosen == "cpp":
        # Raises on NaN/Inf itself. Outside a traced graph the extension is called directly: the
        # custom-op layer costs ~40 us of Python per call, and ~0.4 ms right after the pass has
        # streamed a volume-sized input through the caches (its code and data are evicted).
        run = _iaf_select_cpp if is_traced(slices) else _C.iaf_select
        keep, dist = run(slices, cu, max_len, gamma)
    else:
        cu = _offsets(cu, rows, max_len, volume.device)
        if chosen == "triton":
            keep, dist = _iaf_select_triton(slices, cu, gamma, max_len)
        else:
            keep, dist = _iaf_select_torch(slices, cu, gamma, max_len)
        _check_finite_volume(op, slices, cu, dist)
    if keep.shape != mask_shape:
        keep = keep.reshape(mask_shape)
    if return_distances:
        return keep, dist if dist.shape == mask_shape else dist.reshape(mask_shape)
    return keep


def _check_finite_volume(op: str, slices: torch.Tensor, cu: torch.Tensor, dist: torch.Tensor) -> None:
    """NaN/Inf check fused into the distance pass: a non-finite value makes every distance it enters
    non-finite, and every slice of a volume of two or more slices enters one (slice 0 with slice 1).
    A separate pre-pass would read the whole volume a second time (2x the bytes of the op itself);
    only 1-slice volumes, which compare nothing, are read again. On CUDA and under torch.compile the
    segment lengths are not read on the host, so the first slice of every volume is checked instead."""
    if not slices.dtype.is_floating_point or slices.shape[0] == 0:
        return
    bad = ~torch.isfinite(dist).all()
    if slices.device.type == "cpu" and not torch.compiler.is_compiling():
        starts = cu[:-1][(cu[1:] - cu[:-1]) == 1]
        lone_rows = slices.index_select(0, starts.to(torch.int64)) if starts.numel() else None
    else:
        lone_rows = slices.index_select(0, cu[:-1].to(torch.int64).clamp(max=slices.shape[0] - 1))
    if lone_rows is not None:
        low, high = torch.aminmax(lone_rows)
        bad = bad | ~(torch.isfinite(low) & torch.isfinite(high))
    check_or_defer(bad, f"{op}: volume contains NaN or Inf (or values whose differences overflow float32)")


def _anchor_index(keep: torch.Tensor, cu: torch.Tensor) -> torch.Tensor:
    """Row of the anchor each slice was compared with (itself for a volume's first slice): the last
    kept row before it, found with a cumulative max so no host sync is needed."""
    rows = keep.shape[0]
    index = torch.arange(rows, device=keep.device)
    is_start = torch.zeros(rows + 1, dtype=torch.bool, device=keep.device)
    is_start[cu[:-1].to(torch.int64)] = True
    is_start = is_start[:rows]
    marks = torch.where(keep | is_start, index, -1)
    last_mark = torch.cummax(marks, dim=0).values
    previous = torch.cat([last_mark.new_zeros(1), last_mark[:-1]])
    return torch.where(is_start, index, previous).contiguous()


def anchor_distances(
    volume: torch.Tensor,
    keep: torch.Tensor,
    *,
    cu_seqlens: torch.Tensor | None = None,
    batched: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Distance of every slice to the anchor it is compared with under ``keep`` (for plots).

    Args:
        volume: as in :func:`iaf_select`.
        keep: bool mask of the same leading shape as :func:`iaf_select` returns. A volume's first
            slice is always an anchor, whatever ``keep`` says there.
        cu_seqlens, batched, backend: as in :func:`iaf_select`.

    Returns:
        float32 of ``keep``'s shape: mean|x[s] - x[a(s)]| with a(s) the last kept slice before s in
        its volume; 0 for a volume's first slice. With ``keep = iaf_select(volume, gamma)`` these are
        the distances IAF compared with gamma.
    """
    op = "anchor_distances"
    slices, cu, seqlen, mask_shape = _as_rows(op, volume, cu_seqlens, batched, None)
    if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool:
        raise TypeError(f"{op}: keep must be a bool tensor")
    if tuple(keep.shape) != mask_shape:
        raise ValueError(f"{op}: keep has shape {tuple(keep.shape)}, expected {mask_shape} for this volume")
    if keep.device != volume.device:
        raise ValueError(f"{op}: keep is on {keep.device} but volume is on {volume.device}")
    chosen = resolve_backend(op, volume.device, backend, cpp_ops=("anchor_distances",))
    if slices.shape[0] == 0:
        return torch.zeros(mask_shape, dtype=torch.float32, device=volume.device)
    cu = _offsets(cu, slices.shape[0], seqlen, volume.device)
    anchor = _anchor_index(keep.reshape(-1), cu)
    if chosen == "cpp":
        run = _anchor_distances_cpp if is_traced(slices) else _C.anchor_distances
        dist = run(slices, anchor)  # raises on NaN/Inf itself
    else:
        if chosen == "triton":
            dist = _anchor_distances_triton(slices, anchor)
        else:
            dist = _anchor_distances_torch(slices, anchor)
        _check_finite_volume(op, slices, cu, dist)
    return dist.reshape(mask_shape)


__all__ = ["anchor_distances", "iaf_select"]
