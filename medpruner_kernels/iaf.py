"""IAF, inter-slice anchor filtering: keep a slice when its mean absolute distance to the current
anchor slice exceeds gamma; a kept slice becomes the new anchor.

The rule is sequential (each decision moves the anchor), so the GPU path splits it into a parallel
band pass and one persistent scan launch, a fixed number of launches whatever the slice count:

1. band pass: each program walks a chunk of consecutive slices of one column tile and keeps the
   last BAND slices of that tile in registers (a ring of 8 tiles, rotated by renaming in a loop
   unrolled by BAND), so each element is loaded from global memory once (16-byte loads), plus BAND
   warm-up slices per chunk (chunks are at least MIN_CHUNK slices). It writes per tile the partial
   sums of |x[t + g] - x[t]| for g = 1..BAND, ``part[tile, t, g - 1]``.
2. reduce (only with more than one tile): sums the tiles into ``band[t, g - 1]``.
3. scan, one persistent launch: the first programs (one per volume) are scanners. A scanner holds
   the band rows of SCAN_BLOCK consecutive anchors on chip (one vector load per SCAN_BLOCK anchors) and
   walks the keeps from there, one warp-wide select per keep (the serial part left). A stretch
   longer than BAND with no keep needs distances to an older anchor: the scanner publishes a row
   request (anchor, the next ROW_LEN slices), and the other programs of the launch (workers), with
   the scanner itself, compute its column pieces; pieces are claimed with an atomic ticket, so a
   program only ever waits on work a running program has claimed (no deadlock, whatever the number
   of resident programs; under the interpreter, which runs programs one after another, the scanner
   computes every piece itself).

Bytes: the volume once, plus the warm-up slices (<= 1/32 of it), plus the band sums (BAND floats per
slice and tile, written and read once); in the few-keeps regime at most 10/9 of the volume more: a
request starts at least BAND + 1 slices after the previous one and covers ROW_LEN = BAND + 1 slices,
so rows never overlap, and each request reads its anchor once. Counted under the interpreter:
1.01-1.05x the volume with many keeps, 1.9-2.15x with few (tests/test_iaf.py). Launches: band, reduce
(only with more than one tile) and scan, whatever the slice count.
"""

from __future__ import annotations

import math

import torch

from medpruner_kernels._dispatch import _C, TRITON_AVAILABLE, call_op, is_traced, resolve_backend
from medpruner_kernels._validation import (
    VOLUME_DTYPES,
    check_cu_seqlens,
    check_gamma,
    check_or_defer,
    check_tensor,
)

BAND = 8  # lags kept on chip; the register ring and _stack8 are written for 8
ROW_LEN = BAND + 1  # slices per row request: requests never overlap (see the module docstring)
BLOCK = 1024  # band tile: 8 columns per thread of 4 warps (16-byte loads for 16-bit dtypes, 2 for fp32)
MIN_CHUNK = 32 * BAND  # slices per band program at least: warm-up re-reads <= 1/32 of the volume
TARGET_PROGRAMS = 1024  # band programs wanted (tiles x chunks) to cover every SM several times
SCAN_BLOCK = 32  # anchors whose band rows a scanner loads at once
ROW_BLOCK = 256  # row piece: 8 columns per lane of the scan kernel's single warp
PIECE_CHUNK = 256  # row pieces a scanner sums per step (4 steps at 512^2: each is one L2 latency)
WORKERS_PER_SM = 4
BLOCK_P = 256  # anchor_distances (one pair per slice)
MAX_TILES = 64
CTL_WORDS = 8  # int32 control words per volume in the scan launch, after the role counter

if TRITON_AVAILABLE:
    import triton
    import triton.language as tl

    # Offsets of a volume's control words: tickets claimed, pieces published, pieces done, scanner
    # finished, and the current request (anchor, first slice, slice count).
    _CLAIM, _PUBLISHED, _DONE, _FINISHED, _ANCHOR, _START, _COUNT = (tl.constexpr(i) for i in range(7))
    _CTL_WORDS = tl.constexpr(CTL_WORDS)

    @triton.jit
    def _load_slice(x_ptr, s, last, row_stride, cols, num_cols):
        # The row bound is folded into the column bound: the interpreter rejects vector & scalar masks.
        bound = tl.where(s < last, num_cols, 0)
        return tl.load(x_ptr + s.to(tl.int64) * row_stride + cols, mask=cols < bound, other=0).to(tl.float32)

    @triton.jit
    def _stack8(a0, a1, a2, a3, a4, a5, a6, a7):
        # [B] x 8 -> [B, 8] (column k = a_k) in registers: join appends an in-thread dim of 2, and the
        # reshape reads the three joined dims in reverse, so the leaves go in bit-reversed order.
        pairs = tl.join(tl.join(tl.join(a0, a4), tl.join(a2, a6)), tl.join(tl.join(a1, a5), tl.join(a3, a7)))
        return tl.reshape(pairs, [a0.shape[0], 8])

    @triton.jit
    def _iaf_band_kernel(
        x_ptr,
        part_ptr,
        row_stride,
        num_rows,
        num_cols,
        chunk_len,
        BAND: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        tl.static_assert(BAND == 8)
        tile = tl.program_id(0)
        chunk = tl.program_id(1)
        cols = tile * BLOCK + tl.arange(0, BLOCK)
        first = chunk * chunk_len
        last = tl.minimum(first + chunk_len, num_rows)
        lags = tl.arange(0, BAND) + 1
        tile_part = part_ptr + tile.to(tl.int64) * num_rows * BAND
        # r7 is the previous slice, r0 the one BAND slices back.
        zero = tl.zeros([BLOCK], dtype=tl.float32)
        r0, r1, r2, r3, r4, r5, r6, r7 = zero, zero, zero, zero, zero, zero, zero, zero
        warm = tl.maximum(first - BAND, 0)
        for step in range(0, last - warm, BAND):
            group = warm + step
            # The group's loads go out together (no store in between), 8 slices in flight per program.
            group_slices = (
                _load_slice(x_ptr, group, last, row_stride, cols, num_cols),
                _load_slice(x_ptr, group + 1, last, row_stride, cols, num_cols),
                _load_slice(x_ptr, group + 2, last, row_stride, cols, num_cols),
                _load_slice(x_ptr, group + 3, last, row_stride, cols, num_cols),
                _load_slice(x_ptr, group + 4, last, row_stride, cols, num_cols),
                _load_slice(x_ptr, group + 5, last, row_stride, cols, num_cols),
                _load_slice(x_ptr, group + 6, last, row_stride, cols, num_cols),
                _load_slice(x_ptr, group + 7, last, row_stride, cols, num_cols),
            )
            for i in tl.static_range(BAND):
                s = group + i
                cur = group_slices[i]
                dists = tl.sum(
                    _stack8(
                        tl.abs(r7 - cur), tl.abs(r6 - cur), tl.abs(r5 - cur), tl.abs(r4 - cur),
                        tl.abs(r3 - cur), tl.abs(r2 - cur), tl.abs(r1 - cur), tl.abs(r0 - cur),
                    ),
                    axis=0,
                )  # fmt: skip
                # Entry (t, g) is d(t, t + g), stored by the chunk that owns t + g; warm-up slices store nothing.
                t = s - lags
                owned = (s >= first) & (s < last)
                tl.store(tile_part + t.to(tl.int64) * BAND + lags - 1, dists, mask=t >= tl.where(owned, 0, s))
                r0, r1, r2, r3, r4, r5, r6, r7 = r1, r2, r3, r4, r5, r6, r7, cur

    @triton.jit
    def _iaf_band_reduce_kernel(part_ptr, band_ptr, num_entries, num_tiles, BLOCK_R: tl.constexpr):
        offsets = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        ok = offsets < num_entries
        total = tl.zeros([BLOCK_R], dtype=tl.float32)
        tile_ptr = part_ptr  # advanced in 64-bit pointer arithmetic: tiles x entries may pass 2**31
        for _ in range(num_tiles):
            total += tl.load(tile_ptr + offsets, mask=ok, other=0.0)
            tile_ptr += num_entries
        tl.store(band_ptr + offsets, total, mask=ok)

    @triton.jit
    def _row_piece(x_ptr, piece_part_ptr, anchor, row_start, count, piece, row_stride, num_cols,
                   num_pieces, ROW_LEN: tl.constexpr, ROW_PAD: tl.constexpr, ROW_BLOCK: tl.constexpr):  # fmt: skip
        """Partial sums of |x[row_start + j] - x[anchor]| over one column piece, j < count. Unrolled
        with no store inside, so the ROW_LEN row loads go out together (one latency per request)."""
        cols = piece * ROW_BLOCK + tl.arange(0, ROW_BLOCK)
        ref = tl.load(x_ptr + anchor.to(tl.int64) * row_stride + cols, mask=cols < num_cols, other=0).to(tl.float32)
        offsets = tl.arange(0, ROW_PAD)
        sums = tl.zeros([ROW_PAD], dtype=tl.float32)
        for j in tl.static_range(ROW_LEN):
            row = (row_start + j).to(tl.int64)
            bound = tl.where(j < count, num_cols, 0)  # the interpreter rejects vector & scalar masks
            cur = tl.load(x_ptr + row * row_stride + cols, mask=cols < bound, other=0).to(tl.float32)
            sums = tl.where(offsets == j, tl.sum(tl.abs(cur - ref), axis=0), sums)
        tl.store(piece_part_ptr + offsets * num_pieces + piece, sums, mask=offsets < count)

    @triton.jit
    def _iaf_scan_kernel(
        x_ptr,
        band_ptr,
        row_part_ptr,
        ctl_ptr,
        cu_ptr,
        keep_ptr,
        dist_ptr,
        gamma,
        inv_cols,
        row_stride,
        num_cols,
        num_segments,
        num_pieces,
        BAND: tl.constexpr,
        ROW_LEN: tl.constexpr,
        ROW_PAD: tl.constexpr,
        SCAN_BLOCK: tl.constexpr,
        ROW_BLOCK: tl.constexpr,
        PIECE_CHUNK: tl.constexpr,
    ):
        # Roles follow a ticket, not the program id: a worker only runs once every scanner has started.
        role = tl.atomic_add(ctl_ptr, 1)
        is_scanner = role < num_segments
        volume = tl.where(is_scanner, role, (role - num_segments) % num_segments)
        ctl = ctl_ptr + 1 + volume * _CTL_WORDS
        piece_part = row_part_ptr + volume.to(tl.int64) * ROW_LEN * num_pieces
        if is_scanner:
            start = tl.load(cu_ptr + volume)
            end = tl.load(cu_ptr + volume + 1)
            tl.store(keep_ptr + start, 1, mask=end > start)
            lags = tl.arange(0, BAND) + 1
            block_rows = tl.arange(0, SCAN_BLOCK)
            offsets = tl.arange(0, ROW_PAD)
            pieces = tl.arange(0, PIECE_CHUNK)
            anchor = start
            pos = start + 1
            block_start = start - SCAN_BLOCK  # no block loaded yet
            block = tl.zeros([SCAN_BLOCK, BAND], dtype=tl.float32)
            published = 0
            held = -1
            while pos < end:
                gap = pos - anchor
                if gap <= BAND:
                    # d(anchor, anchor + g) for g = 1..BAND is in the band: the anchor's row, from the
                    # block on chip (reloaded, one vector load, when the anchor leaves it).
                    if (anchor < block_start) | (anchor >= block_start + SCAN_BLOCK):
                        block_start = anchor
                        anchors = anchor + block_rows
                        block = tl.load(
                            band_ptr + anchors.to(tl.int64)[:, None] * BAND + lags[None, :] - 1,
                            mask=(anchors < end)[:, None],
                            other=0.0,
                        )
                    row = tl.sum(tl.where((block_rows == anchor - block_start)[:, None], block, 0.0), axis=0)
                    band_dist = row * inv_cols
                    targets = anchor + lags
                    candidate = (lags >= gap) & (targets < end)
                    first = tl.min(tl.where(candidate & (band_dist > gamma), lags, BAND + 1), axis=0)
                    tl.store(dist_ptr + targets, band_dist, mask=candidate & (lags <= first))
                    if first <= BAND:
                        anchor = anchor + first
                        tl.store(keep_ptr + anchor, 1)
                        pos = anchor + 1
                    else:
                        pos = anchor + BAND + 1
                else:
                    # A run longer than the band: distances to the anchor for the next ROW_LEN slices.
                    count = tl.minimum(end - pos, ROW_LEN)
                    tl.store(ctl + _ANCHOR, anchor)
                    tl.store(ctl + _START, pos)
                    tl.store(ctl + _COUNT, count)
                    published += num_pieces
                    tl.atomic_xchg(ctl + _PUBLISHED, published)
                    if held < 0:
                        held = tl.atomic_add(ctl + _CLAIM, 1)
                    while held < published:
                        piece = held - (published - num_pieces)
                        _row_piece(x_ptr, piece_part, anchor, pos, count, piece, row_stride, num_cols, num_pieces,
                                   ROW_LEN, ROW_PAD, ROW_BLOCK)  # fmt: skip
                        tl.atomic_add(ctl + _DONE, 1)
                        held = tl.atomic_add(ctl + _CLAIM, 1)
                    # Poll with plain volatile loads (hundreds of pollers of one word would serialise as
                    # atomics), then one acquire so the pieces' partial sums are visible.
                    done = tl.load(ctl + _DONE, volatile=True)
                    while done < published:
                        done = tl.load(ctl + _DONE, volatile=True)
                    tl.atomic_add(ctl + _DONE, 0)
                    sums = tl.zeros([ROW_PAD], dtype=tl.float32)
                    for p0 in range(0, num_pieces, PIECE_CHUNK):
                        piece_ids = p0 + pieces
                        # .cg: the partials were written by other SMs; never serve them from this SM's L1.
                        chunk = tl.load(
                            piece_part + offsets[:, None] * num_pieces + piece_ids[None, :],
                            mask=(offsets < count)[:, None] & (piece_ids < num_pieces)[None, :],
                            other=0.0,
                            cache_modifier=".cg",
                        )
                        sums += tl.sum(chunk, axis=1)
                    row_dist = sums * inv_cols
                    first = tl.min(tl.where((offsets < count) & (row_dist > gamma), offsets, ROW_PAD), axis=0)
                    tl.store(dist_ptr + pos + offsets, row_dist, mask=(offsets < count) & (offsets <= first))
                    if first < ROW_PAD:
                        anchor = pos + first
                        tl.store(keep_ptr + anchor, 1)
                        pos = anchor + 1
                    else:
                        pos = pos + count
            tl.atomic_xchg(ctl + _FINISHED, 1)
        else:
            # A worker computes pieces of its volume's requests until the scanner finishes. It holds one
            # ticket at a time; a ticket past the published pieces belongs to the next request.
            held = tl.atomic_add(ctl + _CLAIM, 1)
            finished = 0
            while finished == 0:
                published = tl.load(ctl + _PUBLISHED, volatile=True)
                if held < published:
                    published = tl.atomic_add(ctl + _PUBLISHED, 0)  # acquire: the request's words
                    anchor = tl.load(ctl + _ANCHOR, cache_modifier=".cg")
                    row_start = tl.load(ctl + _START, cache_modifier=".cg")
                    count = tl.load(ctl + _COUNT, cache_modifier=".cg")
                    piece = held - (published - num_pieces)
                    _row_piece(x_ptr, piece_part, anchor, row_start, count, piece, row_stride, num_cols, num_pieces,
                               ROW_LEN, ROW_PAD, ROW_BLOCK)  # fmt: skip
                    tl.atomic_add(ctl + _DONE, 1)
                    held = tl.atomic_add(ctl + _CLAIM, 1)
                else:
                    finished = tl.load(ctl + _FINISHED, volatile=True)

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
    """Column tiles of anchor_distances: at most MAX_TILES partial sums per distance, each tile a
    multiple of BLOCK_P."""
    tiles = max(1, min(MAX_TILES, triton.cdiv(num_cols, BLOCK_P)))
    tile_cols = triton.cdiv(triton.cdiv(num_cols, tiles), BLOCK_P) * BLOCK_P
    return tile_cols, triton.cdiv(num_cols, tile_cols)


def _band_chunks(rows: int, tiles: int) -> tuple[int, int]:
    """(slices per band program, chunks): enough programs to fill the GPU, at least MIN_CHUNK slices
    each (a program re-reads BAND slices before its chunk to fill its ring)."""
    chunks = max(1, min(rows // MIN_CHUNK, triton.cdiv(TARGET_PROGRAMS, tiles)))
    return triton.cdiv(rows, chunks), chunks


def _num_workers(device: torch.device) -> int:
    # Under the interpreter programs run one after another: one worker checks that idle workers exit.
    if device.type != "cuda":
        return 1
    return WORKERS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count


def _launch_iaf(slices, cu_seqlens, gamma):
    rows, cols = slices.shape
    segments = cu_seqlens.numel() - 1
    device = slices.device
    tiles = triton.cdiv(cols, BLOCK)
    chunk_len, chunks = _band_chunks(rows, tiles)
    part = torch.empty(tiles * rows * BAND, dtype=torch.float32, device=device)
    _iaf_band_kernel[(tiles, chunks)](
        slices, part, slices.stride(0), rows, cols, chunk_len, BAND=BAND, BLOCK=BLOCK, num_warps=4
    )
    band = part
    if tiles > 1:
        band = torch.empty(rows * BAND, dtype=torch.float32, device=device)
        _iaf_band_reduce_kernel[(triton.cdiv(rows * BAND, 1024),)](
            part, band, rows * BAND, tiles, BLOCK_R=1024, num_warps=4
        )
    pieces = triton.cdiv(cols, ROW_BLOCK)
    row_part = torch.empty(segments * ROW_LEN * pieces, dtype=torch.float32, device=device)
    ctl = torch.zeros(1 + segments * CTL_WORDS, dtype=torch.int32, device=device)
    keep = torch.zeros(rows, dtype=torch.int8, device=device)
    dist = torch.zeros(rows, dtype=torch.float32, device=device)
    _iaf_scan_kernel[(segments + _num_workers(device),)](
        slices, band, row_part, ctl, cu_seqlens, keep, dist, gamma, 1.0 / cols, slices.stride(0), cols,
        segments, pieces, BAND=BAND, ROW_LEN=ROW_LEN, ROW_PAD=triton.next_power_of_2(ROW_LEN),
        SCAN_BLOCK=SCAN_BLOCK, ROW_BLOCK=ROW_BLOCK, PIECE_CHUNK=PIECE_CHUNK, num_warps=1,
    )  # fmt: skip
    return keep.bool(), dist


def _launch_pair_distances(slices, anchor):
    rows, cols = slices.shape
    tile_cols, num_tiles = _tiling(cols)
    part = torch.empty(rows, num_tiles, dtype=torch.float32, device=slices.device)
    _pair_distance_kernel[(rows, num_tiles)](
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


def _gather_rows(slices: torch.Tensor, index: torch.Tensor, out: torch.Tensor) -> None:
    """``out[i] = float32(slices[index[i]])``, into a buffer reused at every step."""
    if slices.dtype == out.dtype:
        torch.index_select(slices, 0, index, out=out)
    else:
        out.copy_(slices.index_select(0, index))


def _torch_iaf(slices: torch.Tensor, cu_seqlens: torch.Tensor, gamma: float, max_len: int):
    if slices.device.type == "cpu":
        return _torch_iaf_host(slices, cu_seqlens, gamma)
    return _torch_iaf_device(slices, cu_seqlens, gamma, max_len)


def _torch_iaf_host(slices: torch.Tensor, cu_seqlens: torch.Tensor, gamma: float):
    """CPU: a host read costs nothing there, so this is the sequential rule on views of the slices.
    Each distance is formed in one float32 buffer reused for every slice (the eager loop allocates
    two slice-sized temporaries per slice); other dtypes widen into a second buffer that holds the
    anchor."""
    rows, cols = slices.shape
    keep = torch.zeros(rows, dtype=torch.bool)
    dist = torch.zeros(rows, dtype=torch.float32)
    diff = torch.empty(cols, dtype=torch.float32)
    widen = slices.dtype != torch.float32
    anchor_buffer = torch.empty(cols, dtype=torch.float32) if widen else None
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end <= start:
            continue
        keep[start] = True
        anchor = slices[start]
        if widen:
            anchor = anchor_buffer.copy_(anchor)
        for row in range(start + 1, end):
            if widen:
                diff.copy_(slices[row]).sub_(anchor)
            else:
                torch.sub(slices[row], anchor, out=diff)
            d = diff.abs_().mean()
            dist[row] = d
            if d > gamma:
                keep[row] = True
                anchor = anchor_buffer.copy_(slices[row]) if widen else slices[row]
    return keep, dist


def _torch_iaf_device(slices: torch.Tensor, cu_seqlens: torch.Tensor, gamma: float, max_len: int):
    """The per-slice loop, vectorised over volumes, with the anchor kept on the device: no host sync.
    Volume b's s-th slice is row cu[b] + s; rows past a volume's end are masked out. Every step
    gathers the B current and B anchor slices into two float32 buffers allocated once and forms the
    distances in place (no per-step allocation, no padded copy of the volume)."""
    rows, cols = slices.shape
    device = slices.device
    starts = cu_seqlens[:-1].to(torch.int64)
    lengths = cu_seqlens[1:].to(torch.int64) - starts
    # Row `rows` of keep and dist is a sink for the volumes that have ended; their reads go to any
    # valid row instead (the result is masked out).
    keep = torch.zeros(rows + 1, dtype=torch.bool, device=device)
    dist = torch.zeros(rows + 1, dtype=torch.float32, device=device)
    sink = torch.full_like(starts, rows)
    keep.index_fill_(0, torch.where(lengths > 0, starts, sink), True)
    last_row = max(rows - 1, 0)
    anchor = starts.clamp(max=last_row)
    current = torch.empty(starts.numel(), cols, dtype=torch.float32, device=device)
    reference = torch.empty_like(current)
    for step in range(1, max_len):
        live = lengths > step
        row = torch.where(live, starts + step, sink)
        _gather_rows(slices, row.clamp(max=last_row), current)
        _gather_rows(slices, anchor, reference)
        d = current.sub_(reference).abs_().mean(dim=1)
        hit = live & (d > gamma)
        dist.index_put_((row,), torch.where(live, d, 0.0))
        keep.index_put_((row,), hit | keep[row])
        anchor = torch.where(hit, row, anchor)
    return keep[:rows].clone(), dist[:rows].clone()


# ------------------------------------------------------------------------------------ registered ops
# One op per public function; every backend's kernel takes the same arguments: the [rows, cols] slices,
# int32 offsets or None (volumes of ``seqlen`` rows each; with offsets ``seqlen`` is the longest).
def _iaf_select_triton(slices, cu_seqlens, seqlen, gamma):
    return _launch_iaf(slices, _offsets(cu_seqlens, slices.shape[0], seqlen, slices.device), gamma)


def _iaf_select_cpp(slices, cu_seqlens, seqlen, gamma):
    return _C.iaf_select(slices, cu_seqlens, seqlen, gamma)


def _iaf_select_torch(slices, cu_seqlens, seqlen, gamma):
    return _torch_iaf(slices, _offsets(cu_seqlens, slices.shape[0], seqlen, slices.device), gamma, seqlen)


_IAF_SELECT_KERNELS = {"triton": _iaf_select_triton, "cpp": _iaf_select_cpp, "torch": _iaf_select_torch}
_ANCHOR_DISTANCES_KERNELS = {
    "triton": _launch_pair_distances,
    "cpp": lambda slices, anchor: _C.anchor_distances(slices, anchor),
    "torch": _torch_pair_distances,
}


@torch.library.custom_op("medpruner::iaf_select", mutates_args=())
def _iaf_select_op(
    slices: torch.Tensor, cu_seqlens: torch.Tensor | None, seqlen: int, gamma: float, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    return _IAF_SELECT_KERNELS[backend](slices, cu_seqlens, seqlen, gamma)


@_iaf_select_op.register_fake
def _(slices, cu_seqlens, seqlen, gamma, backend):
    rows = slices.shape[0]
    return slices.new_empty(rows, dtype=torch.bool), slices.new_empty(rows, dtype=torch.float32)


@torch.library.custom_op("medpruner::anchor_distances", mutates_args=())
def _anchor_distances_op(slices: torch.Tensor, anchor: torch.Tensor, backend: str) -> torch.Tensor:
    return _ANCHOR_DISTANCES_KERNELS[backend](slices, anchor)


@_anchor_distances_op.register_fake
def _(slices, anchor, backend):
    return slices.new_empty(slices.shape[0], dtype=torch.float32)


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
        max_seqlen: longest volume of a varlen batch: the torch path's loop bound (default: read
            from ``cu_seqlens`` on CPU, the total slice count on CUDA, which is always safe). The
            Triton path does not need it: its launch count is fixed.
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
        # The compiled kernel raises on NaN/Inf itself, and takes a uniform length without offsets.
        keep, dist = call_op(_iaf_select_op, _IAF_SELECT_KERNELS, chosen, slices, cu, max_len, gamma)
    else:
        cu = _offsets(cu, rows, max_len, volume.device)
        keep, dist = call_op(_iaf_select_op, _IAF_SELECT_KERNELS, chosen, slices, cu, max_len, gamma)
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
    only 1-slice volumes, which compare nothing, are read again. On CUDA and in a traced graph
    (torch.compile, make_fx, ...) the segment lengths are not read on the host, so the first slice of
    every volume is checked instead."""
    if not slices.dtype.is_floating_point or slices.shape[0] == 0:
        return
    bad = ~torch.isfinite(dist).all()
    if slices.device.type == "cpu" and not is_traced(slices):
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
    dist = call_op(_anchor_distances_op, _ANCHOR_DISTANCES_KERNELS, chosen, slices, anchor)
    if chosen != "cpp":  # the compiled kernel raises on NaN/Inf itself
        _check_finite_volume(op, slices, cu, dist)
    return dist.reshape(mask_shape)


__all__ = ["anchor_distances", "iaf_select"]
