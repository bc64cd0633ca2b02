"""attention_importance: the softmax attention each key token receives, without an N x N matrix.

Per segment (an image or a slice, packed with ``cu_seqlens``), with ``s = q k^T * scale`` per head:
``received[j] = mean_h sum_i softmax_j(s_h)[i, j]``, so a segment's scores sum to its length.

Triton path, two passes over the segment's tiles (flash-style, O(N * H) extra memory):
  1. one program per (query block, head): the row log-sum-exp over the segment's keys (online max/sum);
  2. one program per (key block, head): column sums of ``exp(s - lse)`` over the segment's query blocks,
     written to a ``[H, N]`` buffer that a fixed-order head mean reduces. Every program owns the
     outputs it writes, so there are no atomics and results are bitwise reproducible.
Programs are laid out over segment-aligned blocks: ``cdiv(N, BLOCK) + B`` programs bound the number of
blocks for any segmentation, a device-side table maps each program to its block (surplus programs
exit), so the launch never reads ``cu_seqlens`` on the host. ``q``/``k`` strides are passed to the
kernels: views such as the q/k slices of a fused qkv projection are read in place, without a copy.

CPU paths: the compiled kernel (``csrc/importance.cpp``, OpenMP over (segment, head) tasks, exact row
softmax over a query block at a time) and a blocked torch path (matmul over query chunks). Both read
``cu_seqlens`` on the host (free on CPU; a sync on CUDA, where the Triton path is the default).
"""

from __future__ import annotations

import math

import torch

from medpruner_kernels import _validation
from medpruner_kernels._dispatch import _C, TRITON_AVAILABLE, call_op, resolve_backend
from medpruner_kernels._triton_common import _bf16_interpreted, interpreter_tiles

_OP = "attention_importance"
# The _C functions the cpp backend needs.
CPP_OPS = ("attention_importance",)
_INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_LOG2E = 1.4426950408889634

if TRITON_AVAILABLE:
    import triton
    import triton.language as tl

    from medpruner_kernels._triton_common import _tile_dot

    @triton.jit
    def _load_q_tile(
        q_ptr, rows, row_ok, head, dims, dim_ok, stride_qn, stride_qh, stride_qd, STRIDE_UNIT: tl.constexpr
    ):
        """``[BLOCK_M, BLOCK_D]`` queries of one head; rows past the segment and padded dims read 0.
        Offsets are int64: row x stride passes 2**31 in views of a fused qkv projection (and
        head x stride in head-major layouts) at a few hundred slices. Row and head strides come in
        units of ``STRIDE_UNIT`` elements (see ``_stride_unit``), so the compiler can prove the
        16-byte alignment that vector loads need."""
        return tl.load(
            q_ptr
            + rows.to(tl.int64)[:, None] * stride_qn * STRIDE_UNIT
            + head.to(tl.int64) * stride_qh * STRIDE_UNIT
            + dims.to(tl.int64)[None, :] * stride_qd,
            mask=row_ok[:, None] & dim_ok[None, :],
            other=0.0,
        )

    @triton.jit
    def _load_k_tile_t(
        k_ptr, cols, col_ok, head, dims, dim_ok, stride_kn, stride_kh, stride_kd, STRIDE_UNIT: tl.constexpr
    ):
        """``[BLOCK_D, BLOCK_N]`` keys of one head, transposed for ``q @ k^T``."""
        return tl.load(
            k_ptr
            + cols.to(tl.int64)[None, :] * stride_kn * STRIDE_UNIT
            + head.to(tl.int64) * stride_kh * STRIDE_UNIT
            + dims.to(tl.int64)[:, None] * stride_kd,
            mask=dim_ok[:, None] & col_ok[None, :],
            other=0.0,
        )

    @triton.jit
    def _row_lse_kernel(
        q_ptr,
        k_ptr,
        lse_ptr,
        cu_ptr,
        block_row0_ptr,
        block_seg_ptr,
        stride_qn,
        stride_qh,
        stride_qd,
        stride_kn,
        stride_kh,
        stride_kd,
        num_heads,
        qk_scale_log2,
        HEAD_DIM: tl.constexpr,
        STRIDE_UNIT: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        IEEE_DOT: tl.constexpr,
        UPCAST: tl.constexpr,
    ):
        pid = tl.program_id(0)
        head = tl.program_id(1)
        row0 = tl.load(block_row0_ptr + pid)
        if row0 >= 0:
            seg = tl.load(block_seg_ptr + pid)
            seg_start = tl.load(cu_ptr + seg)
            seg_end = tl.load(cu_ptr + seg + 1)
            rows = row0 + tl.arange(0, BLOCK_M)
            row_ok = rows < seg_end
            dims = tl.arange(0, BLOCK_D)
            dim_ok = dims < HEAD_DIM
            q = _load_q_tile(
                q_ptr, rows, row_ok, head, dims, dim_ok, stride_qn, stride_qh, stride_qd, STRIDE_UNIT
            )
            # Scores are kept in base 2 (scale folded with log2 e) so the inner loop uses exp2.
            running_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
            running_sum = tl.zeros([BLOCK_M], tl.float32)
            for col0 in range(seg_start, seg_end, BLOCK_N):
                cols = col0 + tl.arange(0, BLOCK_N)
                col_ok = cols < seg_end
                k_t = _load_k_tile_t(
                k_ptr, cols, col_ok, head, dims, dim_ok, stride_kn, stride_kh, stride_kd, STRIDE_UNIT
            )
                s = _tile_dot(q, k_t, IEEE_DOT, UPCAST)
                s = tl.where(col_ok[None, :], s * qk_scale_log2, float("-inf"))
                new_max = tl.maximum(running_max, tl.max(s, axis=1))
                running_sum = running_sum * tl.exp2(running_max - new_max) + tl.sum(
                    tl.exp2(s - new_max[:, None]), axis=1
                )
                running_max = new_max
            lse = running_max + tl.log2(running_sum)
            tl.store(lse_ptr + rows.to(tl.int64) * num_heads + head, lse, mask=row_ok)

    @triton.jit
    def _column_sum_kernel(
        q_ptr,
        k_ptr,
        lse_ptr,
        partial_ptr,
        cu_ptr,
        block_row0_ptr,
        block_seg_ptr,
        stride_qn,
        stride_qh,
        stride_qd,
        stride_kn,
        stride_kh,
        stride_kd,
        num_tokens,
        num_heads,
        qk_scale_log2,
        HEAD_DIM: tl.constexpr,
        STRIDE_UNIT: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        IEEE_DOT: tl.constexpr,
        UPCAST: tl.constexpr,
    ):
        pid = tl.program_id(0)
        head = tl.program_id(1)
        col0 = tl.load(block_row0_ptr + pid)
        if col0 >= 0:
            seg = tl.load(block_seg_ptr + pid)
            seg_start = tl.load(cu_ptr + seg)
            seg_end = tl.load(cu_ptr + seg + 1)
            cols = col0 + tl.arange(0, BLOCK_N)
            col_ok = cols < seg_end
            dims = tl.arange(0, BLOCK_D)
            dim_ok = dims < HEAD_DIM
            k_t = _load_k_tile_t(
                k_ptr, cols, col_ok, head, dims, dim_ok, stride_kn, stride_kh, stride_kd, STRIDE_UNIT
            )
            received = tl.zeros([BLOCK_N], tl.float32)
            for r0 in range(seg_start, seg_end, BLOCK_M):
                rows = r0 + tl.arange(0, BLOCK_M)
                row_ok = rows < seg_end
                q = _load_q_tile(
                q_ptr, rows, row_ok, head, dims, dim_ok, stride_qn, stride_qh, stride_qd, STRIDE_UNIT
            )
                # +inf for rows past the segment makes their probabilities exactly 0.
                lse = tl.load(lse_ptr + rows.to(tl.int64) * num_heads + head, mask=row_ok, other=float("inf"))
                s = _tile_dot(q, k_t, IEEE_DOT, UPCAST)
                p = tl.exp2(s * qk_scale_log2 - lse[:, None])
                received += tl.sum(p, axis=0)
            tl.store(partial_ptr + head.to(tl.int64) * num_tokens + cols, received, mask=col_ok)


def _block_table(cu_seqlens: torch.Tensor, num_tokens: int, block: int):
    """Map program ids to segment-aligned blocks on the device: (first row of the block or -1, segment).

    ``cdiv(N, block) + B`` programs cover every segmentation, because sum_b cdiv(len_b, block) is at
    most that; the table is built with device ops, so the launch needs no host read of cu_seqlens.
    """
    num_segments = cu_seqlens.numel() - 1
    cu = cu_seqlens.to(torch.int64)
    blocks_per_segment = (cu[1:] - cu[:-1] + block - 1) // block
    block_end = torch.cumsum(blocks_per_segment, 0)
    num_programs = (num_tokens + block - 1) // block + num_segments
    program = torch.arange(num_programs, device=cu.device, dtype=torch.int64)
    seg = torch.searchsorted(block_end, program, right=True)
    seg_clamped = seg.clamp(max=num_segments - 1)
    first_block = block_end[seg_clamped] - blocks_per_segment[seg_clamped]
    row0 = cu[seg_clamped] + (program - first_block) * block
    row0 = torch.where(seg < num_segments, row0, -1)
    return row0.to(torch.int32), seg_clamped.to(torch.int32), num_programs


def _stride_unit(q: torch.Tensor, k: torch.Tensor) -> int:
    """Elements per 16 bytes when every row and head stride of ``q`` and ``k`` is a multiple of it and
    channels are contiguous, else 1 (any strides, scalar loads). The kernels take those strides divided
    by the unit and multiply by it as a constexpr: a head stride of 72 (Qwen3-VL, SigLIP) is no multiple
    of 16, so the JIT gives it no divisibility hint and 16-bit q/k were loaded 2 bytes at a time;
    ``9 * 8`` proves 16-byte alignment and the loads become 16 bytes wide."""
    unit = 16 // q.element_size()
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1))
    if q.stride(2) == 1 and k.stride(2) == 1 and all(s % unit == 0 for s in strides):
        return unit
    return 1


def _triton_config(head_dim: int, dtype: torch.dtype, device: torch.device):
    block_d = max(16, triton.next_power_of_2(head_dim))
    if interpreter_tiles(device):
        # The interpreter runs every tile op in numpy: small tiles keep interpreted tests fast.
        return 16, 16, block_d, {}
    if dtype == torch.float32:
        # An IEEE float32 dot is FMAs on the operands held in registers: 64 x 64 tiles over 128 dims
        # spilled ~6.5 KB of stack on sm_80/sm_90 (bench/codegen.py); 32 x 32 tiles fit.
        return 32, 32, block_d, {"num_warps": 4, "num_stages": 2}
    if block_d > 128:
        return 32, 64, block_d, {"num_warps": 4, "num_stages": 2}
    return 64, 64, block_d, {"num_warps": 4, "num_stages": 2}


def _importance_triton(q: torch.Tensor, k: torch.Tensor, cu_seqlens: torch.Tensor, scale: float, group: int):
    num_tokens, num_heads, head_dim = q.shape
    if num_tokens == 0:
        return q.new_zeros((0,), dtype=torch.float32)
    block_m, block_n, block_d, launch = _triton_config(head_dim, q.dtype, q.device)
    ieee = q.dtype == torch.float32
    upcast = _bf16_interpreted(q)
    qk_scale_log2 = scale * _LOG2E
    unit = _stride_unit(q, k)
    strides = (q.stride(0) // unit, q.stride(1) // unit, q.stride(2),
               k.stride(0) // unit, k.stride(1) // unit, k.stride(2))  # fmt: skip
    lse = torch.empty((num_tokens, num_heads), device=q.device, dtype=torch.float32)
    row0, seg, programs = _block_table(cu_seqlens, num_tokens, block_m)
    _row_lse_kernel[(programs, num_heads)](
        q, k, lse, cu_seqlens, row0, seg,
        *strides, num_heads, qk_scale_log2, HEAD_DIM=head_dim, STRIDE_UNIT=unit,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, IEEE_DOT=ieee, UPCAST=upcast, **launch,
    )  # fmt: skip
    partial = torch.empty((num_heads, num_tokens), device=q.device, dtype=torch.float32)
    col0, seg, programs = _block_table(cu_seqlens, num_tokens, block_n)
    _column_sum_kernel[(programs, num_heads)](
        q, k, lse, partial, cu_seqlens, col0, seg,
        *strides, num_tokens, num_heads, qk_scale_log2, HEAD_DIM=head_dim, STRIDE_UNIT=unit,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, IEEE_DOT=ieee, UPCAST=upcast, **launch,
    )  # fmt: skip
    return _group_mean(partial.sum(dim=0) / num_heads, group)


def _group_mean(received: torch.Tensor, group: int) -> torch.Tensor:
    return received.reshape(-1, group).mean(dim=1) if group > 1 else received


def _importance_cpp(q: torch.Tensor, k: torch.Tensor, cu_seqlens: torch.Tensor, scale: float, group: int):
    return _group_mean(_C.attention_importance(q, k, cu_seqlens, scale), group)


# Elements of one chunk of scores (heads x queries x keys): 4 Mi fp32 = 16 MiB whatever N is.
_TORCH_CHUNK_ELEMENTS = 1 << 22


def _importance_torch_segments(q, k, starts: list[int], length: int, scale: float, out: torch.Tensor):
    """Segments of one common length, batched: chunks of (segments, queries) bound the score buffer."""
    num_heads = q.shape[1]
    offsets = torch.arange(length, device=q.device)
    per_segment = max(1, _TORCH_CHUNK_ELEMENTS // (num_heads * length * length))
    for first in range(0, len(starts), per_segment):
        rows = torch.tensor(starts[first : first + per_segment], device=q.device)[:, None] + offsets
        keys = k[rows].to(torch.float32).permute(0, 2, 3, 1)  # [S, H, Dh, L]
        received = torch.zeros(rows.shape, device=q.device, dtype=torch.float32)
        query_chunk = max(1, _TORCH_CHUNK_ELEMENTS // (rows.shape[0] * num_heads * length))
        for q0 in range(0, length, query_chunk):
            queries = q[rows[:, q0 : q0 + query_chunk]].to(torch.float32).transpose(1, 2)  # [S, H, c, Dh]
            probs = torch.softmax(torch.matmul(queries, keys) * scale, dim=-1)
            received += probs.sum(dim=(1, 2))
        out[rows] = received / num_heads


def _importance_torch(q: torch.Tensor, k: torch.Tensor, cu_seqlens: torch.Tensor, scale: float, group: int):
    out = torch.zeros(q.shape[0], device=q.device, dtype=torch.float32)
    offsets = cu_seqlens.tolist()
    by_length: dict[int, list[int]] = {}
    for start, end in zip(offsets[:-1], offsets[1:]):
        if end > start:
            by_length.setdefault(end - start, []).append(start)
    for length, starts in by_length.items():
        _importance_torch_segments(q, k, starts, length, scale, out)
    return _group_mean(out, group)


# ------------------------------------------------------------------------------------ registered op
_KERNELS = {"triton": _importance_triton, "cpp": _importance_cpp, "torch": _importance_torch}


@torch.library.custom_op("medpruner::attention_importance", mutates_args=())
def _importance_op(
    q: torch.Tensor, k: torch.Tensor, cu_seqlens: torch.Tensor, scale: float, group: int, backend: str
) -> torch.Tensor:
    return _KERNELS[backend](q, k, cu_seqlens, scale, group)


@_importance_op.register_fake
def _(q, k, cu_seqlens, scale, group, backend):
    return q.new_empty((q.shape[0] // group,), dtype=torch.float32)


def _validate(q, k, cu_seqlens, scale, group):
    _validation.check_tensor(_OP, "q", q, _INPUT_DTYPES)
    _validation.check_tensor(_OP, "k", k, _INPUT_DTYPES)
    if q.dim() != 3:
        raise ValueError(f"{_OP}: q must be [N, H, Dh], got shape {tuple(q.shape)}")
    if k.shape != q.shape:
        raise ValueError(f"{_OP}: k must have q's shape {tuple(q.shape)}, got {tuple(k.shape)}")
    if k.dtype != q.dtype:
        raise TypeError(f"{_OP}: k has dtype {k.dtype} but q has {q.dtype}; they must match")
    if k.device != q.device:
        raise ValueError(f"{_OP}: k is on {k.device} but q is on {q.device}")
    if q.shape[1] == 0 or q.shape[2] == 0:
        raise ValueError(f"{_OP}: q needs at least one head and one channel, got shape {tuple(q.shape)}")
    if isinstance(group, bool) or not isinstance(group, int):
        raise TypeError(f"{_OP}: group must be an int, got {type(group).__name__}")
    if group < 1:
        raise ValueError(f"{_OP}: group must be >= 1, got {group}")
    if scale is None:
        scale = q.shape[2] ** -0.5
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"{_OP}: scale must be a Python float or None, got {type(scale).__name__}")
    elif not math.isfinite(scale):
        raise ValueError(f"{_OP}: scale must be finite, got {scale}")
    num_tokens = q.shape[0]
    cu_seqlens = _validation.check_cu_seqlens(_OP, cu_seqlens, num_tokens, q.device)
    if num_tokens % group:
        raise ValueError(f"{_OP}: group={group} does not divide the number of tokens N={num_tokens}")
    if group > 1:
        lengths = cu_seqlens[1:] - cu_seqlens[:-1]
        _validation.check_or_defer(
            (lengths % group != 0).any(),
            f"{_OP}: every cu_seqlens segment length must be a multiple of group={group}",
        )
    _validation.check_finite(_OP, "q", q)
    _validation.check_finite(_OP, "k", k)
    return cu_seqlens, float(scale)


def attention_importance(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    cu_seqlens: torch.Tensor | None = None,
    scale: float | None = None,
    group: int = 1,
    backend: str = "auto",
) -> torch.Tensor:
    """The softmax attention each key token receives, per segment, head-averaged, summed over queries.

    Args:
        q, k: ``[N, H, Dh]`` float32/float16/bfloat16, same shape, dtype and device, any strides
            (the Triton kernels read them in place; the CPU paths copy to float32). Post-RoPE
            queries/keys of one attention layer; ``Dh`` need not be a power of two.
        cu_seqlens: int32 ``[B+1]`` offsets of the packed segments (images or slices); attention only
            within a segment. ``None``: one segment of ``N`` tokens.
        scale: softmax scale, default ``Dh ** -0.5``.
        group: average consecutive groups of ``group`` tokens (Qwen's 2x2 merge blocks: 4). Every
            segment length must be a multiple of ``group``.
        backend: ``"auto"`` | ``"triton"`` | ``"cpp"`` | ``"torch"``.

    Returns:
        float32 ``[N // group]``: ``r[j] = (1/H) sum_h sum_{i in seg(j)} softmax_j(q_i k^T * scale)``,
        then the mean over each group. A segment's ungrouped scores sum to its length. Accumulation is
        float32; no ``N x N`` matrix is ever built.
    """
    cu_seqlens, scale = _validate(q, k, cu_seqlens, scale, group)
    chosen = resolve_backend(_OP, q.device, backend, cpp_ops=CPP_OPS)
    return call_op(_importance_op, _KERNELS, chosen, q, k, cu_seqlens, scale, group)
