"""DINS nucleus selection: per slice, keep the smallest set of highest-mass tokens whose mass reaches tau.

Backends:

* ``triton``: one program per ``ROWS`` slices (``ROWS * BLOCK`` <= 512 tokens, or one slice of up to
  8192; ragged batches through
  ``cu_seqlens``). A program loads its slices and computes the masses in fp32 (max-subtracted softmax,
  or a plain normalisation). It never sorts: masses are >= +0.0, so their int32 bit patterns order like
  the floats, and a bisection over bit patterns (31 masked sums) finds the cut mass, the mass of the
  token at which the sorted cumulative sum reaches tau. Tokens above the cut are kept, tied tokens in
  index order (a cumulative count gives each its place among the ties). After the min/max clamps a
  radix select over the bit patterns selects the top ``count`` tokens the same way. With fixed
  ``counts`` (the token budget) the program skips the masses and radix-selects the top scores
  (float32 keys, float64 keys for float64 scores: exact ranks on every dtype). It also writes per-slice
  validity flags, so on CUDA the whole batch costs two launches (the kernel and one reduction of the
  flags), reads nothing on the host and can be captured in a CUDA graph.
* ``cpp``: ``medpruner_kernels._C.nucleus_select_cpu`` (csrc/nucleus.cpp), OpenMP over slices, float64.
* ``torch``: vectorised torch (sort, cumsum, scatter); also the baseline of ``bench/bench_nucleus.py``.
"""

from __future__ import annotations

import math

import torch

from medpruner_kernels import _dispatch, _validation
from medpruner_kernels._dispatch import TRITON_AVAILABLE

OP = "nucleus_select"
CPP_OPS = ("nucleus_select_cpu",)
# One program holds a whole slice in registers: 16384 tokens spill on sm_80/sm_90 at any warp count
# (compiled with the Triton wheel's ptxas), 8192 at 16 warps do not.
MAX_TRITON_TOKENS = 8192

# Columns of the Triton kernel's per-slice flag output.
_FLAG_SCORES, _FLAG_TAU, _FLAG_SEGMENT, _FLAG_COUNTS = 0, 1, 2, 3
_NUM_FLAGS = 4

if TRITON_AVAILABLE:
    import triton
    import triton.language as tl

    # Masses lie in [+0.0, 1.0]: their int32 bit patterns lie below the bits of +inf, and 31 halvings
    # of [0, 2^31) pin down one bit pattern.
    _INF_BITS = tl.constexpr(0x7F800000)
    _BISECT_STEPS = tl.constexpr(31)

    @triton.jit
    def _order_key(x, KEY64: tl.constexpr):
        """A signed integer that orders like the float ``x``: negative floats have their magnitude bits
        flipped (their bit patterns order backwards), and -0.0 becomes +0.0 (an equal score, a tie)."""
        x = tl.where(x == 0, 0.0, x)
        if KEY64:
            bits = x.to(tl.int64, bitcast=True)
            return bits ^ ((bits >> 63) & 0x7FFFFFFFFFFFFFFF)
        else:
            bits = x.to(tl.int32, bitcast=True)
            return bits ^ ((bits >> 31) & 0x7FFFFFFF)

    @triton.jit
    def _count(mask):
        """Per row, the number of True lanes, as an int32 computed through a float sum."""
        return tl.sum(tl.where(mask, 1.0, 0.0), axis=1).to(tl.int32)

    @triton.jit
    def _keep_top(key, valid, count, KEY64: tl.constexpr):
        """Per row, the ``count`` valid lanes with the largest keys, ties to the lower lane.

        A radix select finds the cut, the largest key v with #(key >= v) >= count (the count-th largest
        key; the largest integer when count is 0), one masked count per bit from the sign down: no sort,
        no data movement between lanes. A cumulative count then ranks the tokens tied at the cut.

        Counts outside the loop are float sums (exact below 2**24): LLVM rewrites an integer sum of
        bools into popcounts of the mask bitcast to an integer, which NVPTX builds through local memory
        (a stack frame) once the rows of a thread are vectorised together."""
        nonneg = _count(valid & (key >= 0))
        if KEY64:
            cut = tl.where(nonneg >= count, 0, -9223372036854775808).to(tl.int64)
            one = tl.full(cut.shape, 1, tl.int64)
            for i in range(63):
                candidate = cut | (one << (62 - i))
                enough = tl.sum((valid & (key >= candidate[:, None])).to(tl.int32), axis=1) >= count
                cut = tl.where(enough, candidate, cut)
        else:
            cut = tl.where(nonneg >= count, 0, -2147483648).to(tl.int32)
            one = tl.full(cut.shape, 1, tl.int32)
            for i in range(31):
                candidate = cut | (one << (30 - i))
                enough = tl.sum((valid & (key >= candidate[:, None])).to(tl.int32), axis=1) >= count
                cut = tl.where(enough, candidate, cut)
        above = valid & (key > cut[:, None])
        tied = valid & (key == cut[:, None])
        tie_rank = tl.cumsum(tied.to(tl.int32), axis=1)
        tied_needed = count - _count(above)
        return above | (tied & (tie_rank <= tied_needed[:, None]))

    @triton.jit
    def _nucleus_kernel(
        scores_ptr,
        stride_row,
        stride_tok,
        cu_ptr,
        tau_ptr,
        tau_scalar,
        temperature,
        counts_ptr,
        keep_ptr,
        flags_ptr,
        num_slices,
        n_cols,
        total_tokens,
        max_seqlen,
        min_keep,
        max_keep,
        VARLEN: tl.constexpr,
        SOFTMAX: tl.constexpr,
        TAU_PER_SLICE: tl.constexpr,
        FIXED_COUNT: tl.constexpr,
        KEY64: tl.constexpr,
        ROWS: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)
        row_valid = rows < num_slices
        segment_bad = tl.zeros([ROWS], dtype=tl.int1)
        if VARLEN:
            start_raw = tl.load(cu_ptr + rows, mask=row_valid, other=0).to(tl.int64)
            end_raw = tl.load(cu_ptr + rows + 1, mask=row_valid, other=0).to(tl.int64)
            # cu_seqlens is validated by these flags, not on the host: clamp so that bad offsets can
            # never send a load or store out of bounds before the error is raised.
            start = tl.minimum(tl.maximum(start_raw, 0), total_tokens)
            end = tl.minimum(tl.maximum(end_raw, start), total_tokens)
            n = end - start
            segment_bad = (start != start_raw) | (end != end_raw) | (n > max_seqlen)
            segment_bad = segment_bad | ((rows == 0) & (start_raw != 0))
            segment_bad = segment_bad | ((rows == num_slices - 1) & (end_raw != total_tokens))
            n = tl.minimum(n, BLOCK)
            row_offset = start * stride_tok
        else:
            start = rows * n_cols
            n = tl.zeros([ROWS], dtype=tl.int64) + n_cols
            row_offset = rows * stride_row
        n = tl.where(row_valid, n, 0)

        offs = tl.arange(0, BLOCK)
        valid = offs[None, :] < n[:, None]
        raw = tl.load(
            scores_ptr + row_offset[:, None] + offs[None, :].to(tl.int64) * stride_tok, mask=valid, other=0.0
        )
        x = raw.to(tl.float32)
        # Float reductions, not counts of a bool mask: LLVM turns a sum of bools into a popcount of the
        # mask bitcast to an integer, which NVPTX builds through local memory (a stack frame).
        # x * 0 is 0 for finite x and NaN for NaN/Inf, so the sum is NaN exactly when one is present.
        poison = tl.sum(tl.where(valid, x * 0.0, 0.0), axis=1)
        scores_bad = poison != poison
        if not SOFTMAX:
            scores_bad = scores_bad | (tl.min(tl.where(valid, x, 0.0), axis=1) < 0)

        # tau is checked in both modes, so that an argument is valid or not whatever else is passed.
        tau_bad = tl.zeros([ROWS], dtype=tl.int1)
        if TAU_PER_SLICE:
            tau = tl.load(tau_ptr + rows, mask=row_valid, other=1.0).to(tl.float32)
            tau_bad = ~(tau > 0.0)
        else:
            tau = tl.zeros([ROWS], dtype=tl.float32) + tau_scalar
        counts_bad = tl.zeros([ROWS], dtype=tl.int1)
        if FIXED_COUNT:
            # Both masses (softmax, and scores / sum) increase strictly with the score, so ranking the
            # scores themselves ranks the exact masses: no fp32 underflow can tie distinct scores.
            count_raw = tl.load(counts_ptr + rows, mask=row_valid, other=0).to(tl.int64)
            # counts are validated by this flag on CUDA, and clamped so a bad one never addresses memory
            count = tl.minimum(tl.maximum(count_raw, 0), n)
            counts_bad = count != count_raw
            if KEY64:
                key = _order_key(raw.to(tl.float64), True)
            else:
                key = _order_key(x, False)
            keep = _keep_top(key, valid, count, KEY64)
        else:
            if SOFTMAX:
                x_max = tl.max(tl.where(valid, x, float("-inf")), axis=1)
                # (x - max) / T instead of x / T - max(x / T): x / T may overflow for T < 1, the
                # difference only underflows towards exp(-inf) = 0, which is the right mass.
                e = tl.where(valid, tl.exp((x - x_max[:, None]) / temperature), 0.0)
                # Empty rows (padding, zero-length segments) have no mass: divide by 1, not 0.
                denominator = tl.sum(e, axis=1)
                p = e / tl.where(denominator > 0, denominator, 1.0)[:, None]
                zero_total = tl.zeros([ROWS], dtype=tl.int1)
            else:
                total = tl.sum(tl.where(valid, x, 0.0), axis=1)
                zero_total = total == 0
                p = x / tl.where(zero_total, 1.0, total)[:, None]
            # Also maps -0.0 to +0.0, whose bit pattern would otherwise order below every other mass.
            p = tl.where(valid & (p > 0), p, 0.0)

            bits = p.to(tl.int32, bitcast=True)
            total = tl.sum(p, axis=1)
            # The cut mass: the largest present mass v with sum(p >= v) >= tau, found by bisection on
            # the bit patterns (monotone for masses >= +0.0). Masked reductions instead of a sort: no
            # data movement between lanes, and the same number of passes for every slice length.
            lo = tl.zeros([ROWS], dtype=tl.int32)
            hi = tl.zeros([ROWS], dtype=tl.int32) + _INF_BITS
            for _ in range(_BISECT_STEPS):
                mid = lo + (hi - lo) // 2
                mass_at_least = tl.sum(tl.where(bits >= mid[:, None], p, 0.0), axis=1)
                reached = mass_at_least >= tau
                lo = tl.where(reached, mid, lo)
                hi = tl.where(reached, hi, mid)
            cut = lo[:, None]
            above = valid & (bits > cut)
            mass_above = tl.sum(tl.where(above, p, 0.0), axis=1)
            tied = valid & (bits == cut)
            # Equal masses are taken in index order: the j-th tied token's cumulative mass is
            # mass_above + j * cut, and it is kept when the mass before it is still below tau.
            tie_rank = tl.cumsum(tied.to(tl.int32), axis=1)
            cut_mass = tl.max(tl.where(tied, p, 0.0), axis=1)
            before = mass_above[:, None] + (tie_rank - 1).to(tl.float32) * cut_mass[:, None]
            tied_kept = _count(tied & (before < tau[:, None]))
            count = _count(above) + tied_kept
            count = tl.where(total < tau, n, count).to(tl.int64)
            if not SOFTMAX:
                count = tl.where(zero_total, min_keep, count)
            count = tl.where(tau >= 1.0, n, count)
            count = tl.minimum(tl.maximum(count, min_keep), tl.minimum(max_keep, n))
            # The kept set: the top `count` masses (the clamps may move the cut away from the mass cut).
            keep = _keep_top(bits, valid, count, False)
        tl.store(keep_ptr + start[:, None] + offs[None, :], keep, mask=valid)

        flag_base = flags_ptr + rows * 4
        tl.store(flag_base + 0, scores_bad.to(tl.int8), mask=row_valid)
        tl.store(flag_base + 1, tau_bad.to(tl.int8), mask=row_valid)
        tl.store(flag_base + 2, segment_bad.to(tl.int8), mask=row_valid)
        tl.store(flag_base + 3, counts_bad.to(tl.int8), mask=row_valid)


def _triton_block(max_tokens: int) -> int:
    return max(16, triton.next_power_of_2(max(int(max_tokens), 1)))


def _triton_rows(block: int) -> int:
    """Slices per program: short slices share a program (2D tiles, reductions along the token axis), so
    a batch of 10^4 short slices is a few hundred programs, not 10^4 tiny ones. At most 512 tokens
    (and 32 rows) a program: larger multi-row tiles spilled registers on sm_80/sm_90 (4096 tokens:
    255 registers and 72-88 bytes of stack), as ptxas compiles them."""
    return max(1, min(32, 512 // block))


def _triton_warps(rows: int, block: int) -> int:
    """4 tokens a thread for multi-row tiles, at most 16 for one long slice: every (rows, block) the
    launcher makes compiles without a stack frame for sm_80 and sm_90 (4096 tokens at 16 warps did
    not: ptxas then holds 64 registers and spills 16-24 bytes)."""
    tokens = rows * block
    return 4 if tokens <= 512 else (8 if tokens <= 4096 else 16)


def _launch_triton(
    scores: torch.Tensor,
    tau: torch.Tensor | None,
    tau_scalar: float,
    cu_seqlens: torch.Tensor | None,
    max_seqlen: int,
    temperature: float | None,
    min_keep: int,
    max_keep: int | None,
    counts: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the kernel over every slice (``max_seqlen``: the longest, which sizes the block).

    Returns (keep in ``scores``' shape, flags ``[slices, 4]`` int8: scores invalid, tau invalid,
    segment invalid (bad ``cu_seqlens`` or a segment longer than ``max_seqlen``), count outside
    [0, n])."""
    varlen = cu_seqlens is not None
    slices = cu_seqlens.shape[0] - 1 if varlen else scores.shape[0]
    keep = torch.empty(scores.shape, dtype=torch.bool, device=scores.device)
    flags = torch.empty((slices, _NUM_FLAGS), dtype=torch.int8, device=scores.device)
    # A ragged batch still launches with no tokens at all: the kernel is what checks cu_seqlens on CUDA.
    if slices == 0 or (not varlen and keep.numel() == 0):
        flags.zero_()
        return keep, flags
    int32_max = 2**31 - 1
    block = _triton_block(max_seqlen)
    rows = _triton_rows(block)
    _nucleus_kernel[(triton.cdiv(slices, rows),)](
        scores,
        0 if varlen else scores.stride(0),
        scores.stride(0) if varlen else scores.stride(1),
        cu_seqlens if varlen else scores,
        tau if tau is not None else scores,
        float(tau_scalar),
        1.0 if temperature is None else float(temperature),
        counts if counts is not None else scores,
        keep,
        flags,
        slices,
        0 if varlen else scores.shape[1],
        scores.shape[0],
        min(int(max_seqlen), int32_max),
        min(int(min_keep), int32_max),
        int32_max if max_keep is None else min(int(max_keep), int32_max),
        VARLEN=varlen,
        SOFTMAX=temperature is not None,
        TAU_PER_SLICE=tau is not None,
        FIXED_COUNT=counts is not None,
        # float64 scores are ranked on their own bits only where the rank is all there is to compute.
        KEY64=counts is not None and scores.dtype == torch.float64,
        ROWS=rows,
        BLOCK=block,
        num_warps=_triton_warps(rows, block),
    )
    return keep, flags


# --------------------------------------------------------------------------------------- torch path
def _compute_dtype(scores: torch.Tensor) -> torch.dtype:
    return torch.float64 if scores.dtype == torch.float64 else torch.float32


def _final_count(below, n, tau, tau_scalar, zero_total, min_keep, max_keep):
    """The reference's count rule on per-slice tensors: 1 + #(cumsum < tau), at most n; n when
    tau >= 1; min_keep for an all-zero slice; then clamped to [min_keep, min(max_keep, n)]."""
    count = (below + 1).clamp(max=n) if isinstance(n, int) else torch.minimum(below + 1, n)
    if zero_total is not None:
        count = torch.where(zero_total, min_keep, count)
    if tau is not None:
        count = torch.where(tau >= 1.0, n, count)
    elif tau_scalar >= 1.0:
        count = torch.full_like(count, n) if isinstance(n, int) else n.clone()
    count = count.clamp(min=min_keep)
    if max_keep is not None:
        count = count.clamp(max=max_keep)
    return count.clamp(max=n) if isinstance(n, int) else torch.minimum(count, n)


def _torch_dense(scores, tau, tau_scalar, temperature, min_keep, max_keep, counts):
    slices, tokens = scores.shape
    if slices * tokens == 0:
        return torch.empty((slices, tokens), dtype=torch.bool, device=scores.device)
    x = scores.to(_compute_dtype(scores))
    ranks = torch.arange(tokens, device=scores.device)
    keep = torch.empty((slices, tokens), dtype=torch.bool, device=scores.device)
    if counts is not None:
        # The exact masses order like the scores (see the kernel); -0.0 == 0.0 in the sort's compare.
        order = torch.sort(x, dim=1, descending=True, stable=True).indices
        count = counts.to(torch.int64).clamp(0, tokens)
        return keep.scatter_(1, order, ranks < count.unsqueeze(1))
    zero_total = None
    if temperature is not None:
        p = torch.softmax((x - x.amax(dim=1, keepdim=True)) / temperature, dim=1)
    else:
        total = x.sum(dim=1, keepdim=True)
        p = torch.where(total > 0, x / total, 0.0)
        zero_total = total.squeeze(1) == 0
    sorted_p, order = torch.sort(p, dim=1, descending=True, stable=True)
    cumulative = sorted_p.cumsum(dim=1)
    threshold = tau.unsqueeze(1) if tau is not None else tau_scalar
    below = (cumulative < threshold).sum(dim=1)
    count = _final_count(below, tokens, tau, tau_scalar, zero_total, min_keep, max_keep)
    return keep.scatter_(1, order, ranks < count.unsqueeze(1))


def _torch_varlen(scores, tau, tau_scalar, cu_seqlens, temperature, min_keep, max_keep, counts):
    """Ragged batch without padding (and without reading the longest segment on the host): one global
    stable sort by mass, then a stable sort by segment, groups each segment's tokens by falling mass."""
    total = scores.shape[0]
    segments = cu_seqlens.shape[0] - 1
    keep = torch.empty(total, dtype=torch.bool, device=scores.device)
    if total == 0:
        return keep
    # Clamped so that an invalid cu_seqlens (reported through the deferred flags on CUDA) never indexes
    # out of bounds.
    cu = cu_seqlens.to(torch.int64).clamp(0, total)
    lengths = (cu[1:] - cu[:-1]).clamp(min=0)
    tokens = torch.arange(total, device=scores.device)
    segment = torch.searchsorted(cu[1:], tokens, right=True).clamp(max=segments - 1)
    x = scores.to(_compute_dtype(scores))
    if counts is not None:
        by_score = torch.sort(x, descending=True, stable=True).indices
        order = by_score[torch.sort(segment[by_score], stable=True).indices]
        segment_sorted = segment[order]
        count = torch.minimum(counts.to(torch.int64).clamp(min=0), lengths)
        keep[order] = tokens - cu[segment_sorted] < count[segment_sorted]
        return keep
    zero_total = None
    if temperature is not None:
        seg_max = torch.full((segments,), float("-inf"), dtype=x.dtype, device=x.device)
        seg_max = seg_max.scatter_reduce(0, segment, x, reduce="amax")
        e = torch.exp((x - seg_max[segment]) / temperature)
        seg_sum = torch.zeros(segments, dtype=x.dtype, device=x.device).index_add_(0, segment, e)
        p = e / seg_sum[segment]
    else:
        seg_sum = torch.zeros(segments, dtype=x.dtype, device=x.device).index_add_(0, segment, x)
        p = torch.where(seg_sum[segment] > 0, x / seg_sum[segment], 0.0)
        zero_total = seg_sum == 0
    by_mass = torch.sort(p, descending=True, stable=True).indices
    order = by_mass[torch.sort(segment[by_mass], stable=True).indices]
    segment_sorted = segment[order]
    # float64: a segment's running sum is the difference of two global running sums.
    cumulative = torch.cumsum(p[order].to(torch.float64), dim=0)
    before = torch.cat([cumulative.new_zeros(1), cumulative])[cu[:-1]]
    within = cumulative - before[segment_sorted]
    threshold = tau[segment_sorted] if tau is not None else tau_scalar
    below = torch.zeros(segments, dtype=torch.int64, device=x.device)
    below.index_add_(0, segment_sorted, (within < threshold).to(torch.int64))
    count = _final_count(below, lengths, tau, tau_scalar, zero_total, min_keep, max_keep)
    rank = tokens - cu[segment_sorted]
    keep[order] = rank < count[segment_sorted]
    return keep


# ------------------------------------------------------------------------------------ registered op
# Every backend's kernel returns (keep, flags). The Triton kernel checks the values itself: flags
# [slices, 4] int8 (scores, tau, segments, counts), read only where the checks are deferred (CUDA). The
# CPU kernels' inputs were checked before the call: their flags are empty, [0, 4].
def _no_flags(scores: torch.Tensor) -> torch.Tensor:
    return torch.zeros((0, _NUM_FLAGS), dtype=torch.int8, device=scores.device)


def _nucleus_select_cpp(scores, tau, tau_scalar, cu_seqlens, max_seqlen, temperature, min_keep, max_keep, counts):
    tau64 = None if tau is None else tau.to(torch.float64).contiguous()
    cu64 = None if cu_seqlens is None else cu_seqlens.to(torch.int64).contiguous()
    counts64 = None if counts is None else counts.to(torch.int64).contiguous()
    keep = _dispatch._C.nucleus_select_cpu(scores, tau64, tau_scalar, cu64, temperature, min_keep, max_keep, counts64)
    return keep, _no_flags(scores)


def _nucleus_select_torch(scores, tau, tau_scalar, cu_seqlens, max_seqlen, temperature, min_keep, max_keep, counts):
    if cu_seqlens is None:
        keep = _torch_dense(scores, tau, tau_scalar, temperature, min_keep, max_keep, counts)
    else:
        keep = _torch_varlen(scores, tau, tau_scalar, cu_seqlens, temperature, min_keep, max_keep, counts)
    return keep, _no_flags(scores)


_KERNELS = {"triton": _launch_triton, "cpp": _nucleus_select_cpp, "torch": _nucleus_select_torch}


@torch.library.custom_op("medpruner::nucleus_select", mutates_args=())
def _nucleus_select_op(
    scores: torch.Tensor,
    tau: torch.Tensor | None,
    tau_scalar: float,
    cu_seqlens: torch.Tensor | None,
    max_seqlen: int,
    temperature: float | None,
    min_keep: int,
    max_keep: int | None,
    counts: torch.Tensor | None,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _KERNELS[backend](scores, tau, tau_scalar, cu_seqlens, max_seqlen, temperature, min_keep, max_keep, counts)


@_nucleus_select_op.register_fake
def _(scores, tau, tau_scalar, cu_seqlens, max_seqlen, temperature, min_keep, max_keep, counts, backend):
    slices = scores.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    flag_rows = slices if backend == "triton" else 0
    return (torch.empty(scores.shape, dtype=torch.bool, device=scores.device),
            torch.empty((flag_rows, _NUM_FLAGS), dtype=torch.int8, device=scores.device))


# ------------------------------------------------------------------------------------------ public API
def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _counts_message(op: str) -> str:
    return f"{op}: counts must lie in [0, n] for every slice of n tokens"


def _scores_message(op: str, temperature) -> str:
    if temperature is None:
        return (
            f"{op}: scores must be finite and non-negative when temperature is None (NaN, Inf or < 0 found)"
        )
    return f"{op}: scores contains NaN or Inf"


def _prepare(op, scores, tau, temperature, cu_seqlens, max_seqlen, min_keep, max_keep, backend, counts=None):
    """Validate every argument (ValueError/TypeError naming it) and pick the backend.

    Returns the keyword arguments of the registered op plus ``backend`` and ``deferred``: whether the
    value checks are left to the Triton kernel's flags (CUDA only, so that nothing syncs)."""
    _validation.check_tensor(op, "scores", scores, _validation.FLOAT_DTYPES)
    device = scores.device
    if cu_seqlens is None:
        if scores.dim() != 2:
            raise ValueError(
                f"{op}: scores must be [S, T] (or flat [total_tokens] with cu_seqlens), "
                f"got shape {tuple(scores.shape)}"
            )
        if max_seqlen is not None:
            raise ValueError(f"{op}: max_seqlen only applies to a ragged batch (with cu_seqlens)")
        slices = scores.shape[0]
    else:
        if scores.dim() != 1:
            raise ValueError(
                f"{op}: with cu_seqlens, scores must be flat [total_tokens], got shape {tuple(scores.shape)}"
            )
        _validation.check_cu_structure(op, cu_seqlens, device)
        slices = cu_seqlens.shape[0] - 1
        if max_seqlen is not None and (not _is_int(max_seqlen) or max_seqlen < 0):
            raise ValueError(f"{op}: max_seqlen must be None or an int >= 0, got {max_seqlen!r}")

    tau_tensor, tau_scalar = None, 1.0
    if isinstance(tau, torch.Tensor):
        if not tau.dtype.is_floating_point:
            raise TypeError(f"{op}: tau must be a float or a floating-point tensor, got {tau.dtype}")
        if tau.shape not in ((), (slices,)):
            raise ValueError(
                f"{op}: tau must be a float or a tensor of shape [{slices}], got {tuple(tau.shape)}"
            )
        if tau.device != device:
            raise ValueError(f"{op}: tau is on {tau.device} but scores is on {device}")
        tau_tensor = tau.reshape(1).expand(slices).contiguous() if tau.dim() == 0 else tau.contiguous()
    elif _is_real(tau):
        tau_scalar = _validation.check_tau(op, tau)
    else:
        raise TypeError(f"{op}: tau must be a float or a tensor, got {type(tau).__name__}")

    if temperature is not None:
        if not _is_real(temperature):
            raise TypeError(f"{op}: temperature must be None or a float, got {type(temperature).__name__}")
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"{op}: temperature must be finite and > 0, got {temperature!r}")
        temperature = float(temperature)
    if not _is_int(min_keep):
        raise TypeError(f"{op}: min_keep must be an int, got {type(min_keep).__name__}")
    if min_keep < 0:
        raise ValueError(f"{op}: min_keep must be >= 0, got {min_keep}")
    if max_keep is not None:
        if not _is_int(max_keep):
            raise TypeError(f"{op}: max_keep must be None or an int, got {type(max_keep).__name__}")
        if max_keep < min_keep:
            raise ValueError(f"{op}: max_keep ({max_keep}) must be >= min_keep ({min_keep})")
    if counts is not None:
        _validation.check_count_tensor(op, "counts", counts, slices, "slice", device, "scores")

    resolved = _dispatch.resolve_backend(op, device, backend, cpp_ops=CPP_OPS)
    bound = None
    if resolved == "triton":
        if cu_seqlens is None:
            bound = scores.shape[1]
        elif max_seqlen is not None:
            bound = max_seqlen
        elif device.type == "cpu" and not torch.compiler.is_compiling():
            bound = int((cu_seqlens[1:] - cu_seqlens[:-1]).max().clamp(min=0)) if slices else 0
        else:
            # No host read of cu_seqlens on CUDA or in a compiled graph: every segment fits in the batch.
            bound = scores.shape[0]
        if bound > MAX_TRITON_TOKENS:
            if backend == "triton":
                raise ValueError(
                    f"{op}: backend='triton' handles at most {MAX_TRITON_TOKENS} tokens per slice, but the "
                    f"bound here is {bound} ({'T' if cu_seqlens is None else 'max_seqlen or total tokens'}); "
                    "pass max_seqlen for a ragged batch, or use backend='torch'/'cpp'"
                )
            resolved = "cpp" if _dispatch._cpp_usable(device, CPP_OPS) else "torch"

    deferred = resolved == "triton" and device.type == "cuda"
    if not deferred:
        if cu_seqlens is not None:
            cu_seqlens = _validation.check_cu_seqlens(op, cu_seqlens, scores.shape[0], device)
            if max_seqlen is not None:
                _validation.check_or_defer(
                    (cu_seqlens[1:] - cu_seqlens[:-1]).max() > max_seqlen,
                    f"{op}: a segment of cu_seqlens is longer than max_seqlen ({max_seqlen})",
                )
        if scores.numel():
            # One reduction answers both checks: NaN/Inf show in the min or max, a negative mass in the min.
            low, high = torch.aminmax(scores)
            bad = ~(torch.isfinite(low) & torch.isfinite(high))
            if temperature is None:
                bad = bad | (low < 0)
            _validation.check_or_defer(bad, _scores_message(op, temperature))
        if tau_tensor is not None and slices:
            _validation.check_or_defer(
                ~(tau_tensor > 0).all(), f"{op}: tau must be > 0 and not NaN in every slice"
            )
        if counts is not None and slices:
            # On CUDA the kernel's flags check the counts (no launches here); every path clamps to [0, n].
            if cu_seqlens is None:
                lengths = scores.shape[1]
            else:
                lengths = cu_seqlens[1:].to(torch.int64) - cu_seqlens[:-1].to(torch.int64)
            _validation.check_or_defer(((counts < 0) | (counts > lengths)).any(), _counts_message(op))
    return dict(
        scores=scores,
        tau=tau_tensor,
        tau_scalar=tau_scalar,
        cu_seqlens=cu_seqlens,
        temperature=temperature,
        min_keep=min_keep,
        max_keep=max_keep,
        counts=counts,
        backend=resolved,
        bound=bound,
        deferred=deferred,
        op=op,
    )


def _run(args: dict) -> torch.Tensor:
    op, backend, bound, deferred = (
        args.pop("op"),
        args.pop("backend"),
        args.pop("bound"),
        args.pop("deferred"),
    )
    keep, flags = _dispatch.call_op(
        _nucleus_select_op, _KERNELS, backend, args["scores"], args["tau"], args["tau_scalar"],
        args["cu_seqlens"], bound or 0, args["temperature"], args["min_keep"], args["max_keep"], args["counts"],
    )
    if deferred:
        bad = flags.any(dim=0)
        _validation.check_or_defer(bad[_FLAG_SCORES], _scores_message(op, args["temperature"]))
        if args["tau"] is not None:
            _validation.check_or_defer(bad[_FLAG_TAU], f"{op}: tau must be > 0 and not NaN in every slice")
        if args["cu_seqlens"] is not None:
            _validation.check_or_defer(
                bad[_FLAG_SEGMENT],
                f"{op}: cu_seqlens must start at 0, be non-decreasing, end at the number of tokens "
                f"({args['scores'].shape[0]}) and have no segment longer than max_seqlen ({bound})",
            )
        if args["counts"] is not None:
            _validation.check_or_defer(bad[_FLAG_COUNTS], _counts_message(op))
    return keep


def nucleus_select(
    scores: torch.Tensor,
    tau,
    *,
    temperature: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    min_keep: int = 1,
    max_keep: int | None = None,
    counts: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Per slice, keep the smallest set of highest-mass tokens whose total mass reaches ``tau`` (DINS).

    Args:
        scores: ``[S, T]`` token scores per slice, or flat ``[total_tokens]`` with ``cu_seqlens``;
            float32, float16, bfloat16 or float64, any strides. Must be finite, and non-negative when
            ``temperature`` is None.
        tau: mass to keep, a float or a float tensor ``[S]`` (one per slice; ``[B]`` with cu_seqlens)
            or a 0-d tensor; > 0. ``tau >= 1`` keeps every token (pruning off).
        temperature: ``p = softmax(scores / temperature)`` per slice when given (> 0; the paper uses 1
            for Hulu-Med and 2 for Qwen3-VL/MedGemma); else ``p = scores / sum(scores)``, and a slice
            whose scores sum to 0 keeps its ``min_keep`` lowest-index tokens.
        cu_seqlens: int32 ``[B+1]`` offsets of the slices in flat ``scores`` (0, non-decreasing, ending
            at ``total_tokens``; empty slices allowed).
        max_seqlen: an upper bound on the tokens per slice of a ragged batch, used only to size the
            Triton block (the flash-attn habit). Without it the bound is read from ``cu_seqlens`` on
            CPU, and on CUDA (where that read would sync) it is ``total_tokens``: correct, but slow
            for many short slices, and above 8192 ``backend="auto"`` then takes the torch path.
        min_keep, max_keep: the count is clamped to ``[min_keep, max_keep]`` and to the slice length.
        counts: int32 or int64 ``[S]`` (``[B]`` with cu_seqlens) on ``scores``' device, or None: a
            fixed token budget. Slice ``i`` then keeps exactly its ``counts[i]`` highest-mass tokens
            (``0 <= counts[i] <= n_i``; ties: lower index first), and ``tau``, ``min_keep`` and
            ``max_keep`` play no part in the count (they are still validated). Both masses increase
            strictly with the score, so the exact mass order is the score order: every backend ranks
            the scores themselves, exactly, with no rounding (fp32 masses would underflow to false
            ties far from the top). NaN/Inf (and, without temperature, negative) scores are still
            errors.
        backend: ``"auto" | "triton" | "cpp" | "torch"``.

    Returns:
        bool keep mask of ``scores``' shape in the original token order: per slice the ``count``
        largest ``p`` (ties: lower index first), ``count`` being ``counts[i]`` when given, else the
        smallest prefix of the descending ``p`` whose sum is ``>= tau``, clamped. Masses and sums are
        fp32 on the Triton and torch paths (float64 for float64 input), float64 on the C++ path; a tau
        decision can differ from the float64 reference only where a prefix sum is within rounding of
        ``tau``.

    Invalid values (NaN/Inf or negative scores, bad tau tensor, bad cu_seqlens, counts outside
    ``[0, n_i]``) raise ValueError at once on CPU; on CUDA they are queued without a host sync and
    raised by :func:`medpruner_kernels.raise_pending_errors`.
    """
    return _run(
        _prepare(OP, scores, tau, temperature, cu_seqlens, max_seqlen, min_keep, max_keep, backend, counts)
    )


def nucleus_indices(
    scores: torch.Tensor,
    tau,
    *,
    temperature: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    min_keep: int = 1,
    max_keep: int | None = None,
    counts: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The selection of :func:`nucleus_select` (same arguments) as a ragged pair, without a host sync.

    Returns:
        indices: int64 ``[total_tokens]`` (``S * T`` for ``[S, T]`` scores), a worst-case buffer: the
            kept flat token indices (row-major into ``scores``) in ascending order first, then -1.
        cu_counts: int32 ``[S+1]`` (``[B+1]``): slice ``s`` kept ``indices[cu_counts[s]:cu_counts[s+1]]``;
            ``cu_counts[-1]`` is the number kept in all (reading it is the caller's one sync).
    """
    args = _prepare(
        "nucleus_indices", scores, tau, temperature, cu_seqlens, max_seqlen, min_keep, max_keep, backend, counts
    )
    cu = args["cu_seqlens"]
    keep = _run(args).reshape(-1)
    total = keep.numel()
    if cu is None:
        slices, tokens = scores.shape
        cu = torch.arange(slices + 1, device=scores.device, dtype=torch.int64) * tokens
    kept_through = torch.cumsum(keep, dim=0)
    kept_before = torch.cat([kept_through.new_zeros(1), kept_through])
    cu_counts = kept_before[cu.to(torch.int64).clamp(0, total)].to(torch.int32)
    # Unkept tokens all land in the extra last slot, which is cut off.
    target = torch.where(keep, kept_through - 1, total)
    positions = torch.arange(total, device=keep.device, dtype=torch.int64)
    indices = torch.full((total + 1,), -1, dtype=torch.int64, device=keep.device)
    return indices.scatter_(0, target, positions)[:total], cu_counts
