"""merge_tokens: fold the pruned tokens of each segment into a few contextual tokens (VisionZip-style).

Per segment of n tokens: R = the tokens not kept, ascending; C = max(int(context_frac * n), 1) targets
(or C = num_targets[b], given per segment for a fixed token budget; C = 0 merges nothing) at stride
max(1, len(R) // C) from R (the first C of R[::stride]); every other token of R joins the target whose
L2-normalised key is most cosine-similar (ties: the earlier target); x_out[t] = x[t] + mean(x[members
of t]) (unchanged without members); keep_out = keep | targets.

Triton path, two launches, sync-free and deterministic (no atomics), scratch O(N):
  1. one program per segment: ranks of the unkept tokens (chunked cumsum) into a compacted ``rest``
     list, the segment's target count and stride, the target flags, then for each member the argmax of
     its similarity to the targets, streamed over target and key-channel chunks;
  2. one program per (segment, feature block): per target chunk, the member sum as a one-hot matmul
     over member chunks (fixed order), then ``x[t] + sum / count`` written to the target rows.
The number of targets is data dependent, so nothing is sized by it: loops run to in-kernel bounds.

CPU paths: the compiled kernel (``csrc/merge.cpp``) and a vectorised torch path over padded
(segment, token) blocks. Both read ``cu_seqlens`` on the host (a sync on CUDA, where Triton is the
default). Every path computes in float32 and casts ``x_out`` back to ``x.dtype``.
"""

from __future__ import annotations

import math

import torch

from medpruner_kernels import _validation
from medpruner_kernels._dispatch import _C, TRITON_AVAILABLE, call_op, resolve_backend
from medpruner_kernels._triton_common import _bf16_interpreted, interpreter_tiles

_OP = "merge_tokens"
# The _C functions the cpp backend needs.
CPP_OPS = ("merge_tokens",)
_X_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_NORM_EPS = 1e-12  # torch.nn.functional.normalize's eps: x / max(||x||, eps)

if TRITON_AVAILABLE:
    import triton
    import triton.language as tl

    from medpruner_kernels._triton_common import _tile_dot

    @triton.jit
    def _assign_kernel(
        keep_ptr,
        keys_ptr,
        norm_ptr,
        cu_ptr,
        num_targets_ptr,
        rest_ptr,
        owner_ptr,
        target_flag_ptr,
        seg_info_ptr,
        stride_kn,
        stride_kd,
        key_dim,
        BLOCK_R: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        seg = tl.program_id(0)
        seg_start = tl.load(cu_ptr + seg)
        seg_end = tl.load(cu_ptr + seg + 1)
        lanes = tl.arange(0, BLOCK_R)
        num_rest = seg_start * 0
        for t0 in range(seg_start, seg_end, BLOCK_R):
            tokens = t0 + lanes
            unkept = (tl.load(keep_ptr + tokens, mask=tokens < seg_end, other=1) == 0).to(tl.int32)
            rank = num_rest + tl.cumsum(unkept, axis=0) - 1
            tl.store(rest_ptr + seg_start + rank, tokens, mask=unkept != 0)
            num_rest += tl.sum(unkept, axis=0)
        capacity = tl.load(num_targets_ptr + seg)
        # capacity 0 (no targets): every stride works, the division must not be by zero.
        stride = tl.maximum(num_rest // tl.maximum(capacity, 1), 1)
        num_targets = tl.minimum(capacity, (num_rest + stride - 1) // stride)
        tl.store(seg_info_ptr + seg * 3, num_rest)
        tl.store(seg_info_ptr + seg * 3 + 1, stride)
        tl.store(seg_info_ptr + seg * 3 + 2, num_targets)

        target_lanes = tl.arange(0, BLOCK_C)
        for j0 in range(0, num_targets, BLOCK_C):
            slot = j0 + target_lanes
            target_tok = tl.load(rest_ptr + seg_start + slot * stride, mask=slot < num_targets, other=0)
            tl.store(target_flag_ptr + target_tok, tl.full([BLOCK_C], 1, tl.uint8), mask=slot < num_targets)

        # Element offsets (token x row stride) pass 2**31 for strided views of fused qkv: int64 addressing.
        channels = tl.arange(0, BLOCK_K).to(tl.int64)
        for r0 in range(0, num_rest, BLOCK_R):
            rank = r0 + lanes
            rank_ok = rank < num_rest
            member = rank_ok & (num_targets > 0) & ((rank % stride != 0) | (rank >= num_targets * stride))
            member_tok = tl.load(rest_ptr + seg_start + rank, mask=rank_ok, other=0).to(tl.int64)
            member_norm = tl.load(norm_ptr + member_tok, mask=rank_ok, other=1.0)
            best = tl.full([BLOCK_R], float("-inf"), tl.float32)
            best_slot = tl.zeros([BLOCK_R], tl.int32)
            for j0 in range(0, num_targets, BLOCK_C):
                slot = j0 + target_lanes
                slot_ok = slot < num_targets
                target_tok = tl.load(rest_ptr + seg_start + slot * stride, mask=slot_ok, other=0).to(tl.int64)
                target_norm = tl.load(norm_ptr + target_tok, mask=slot_ok, other=1.0)
                dots = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
                for c0 in range(0, key_dim, BLOCK_K):
                    ch = c0 + channels
                    ch_ok = ch < key_dim
                    member_keys = (
                        tl.load(
                            keys_ptr + member_tok[:, None] * stride_kn + ch[None, :] * stride_kd,
                            mask=rank_ok[:, None] & ch_ok[None, :],
                            other=0.0,
                        ).to(tl.float32)
                        / member_norm[:, None]
                    )
                    target_keys_t = (
                        tl.load(
                            keys_ptr + target_tok[None, :] * stride_kn + ch[:, None] * stride_kd,
                            mask=ch_ok[:, None] & slot_ok[None, :],
                            other=0.0,
                        ).to(tl.float32)
                        / target_norm[None, :]
                    )
                    # ieee: an argmax decision must not flip on tf32 rounding.
                    dots += tl.dot(member_keys, target_keys_t, input_precision="ieee")
                sim = tl.where(slot_ok[None, :], dots, float("-inf"))
                chunk_best = tl.max(sim, axis=1)
                # Lowest slot among the maxima: the earlier target wins a tie.
                chunk_slot = tl.min(tl.where(sim == chunk_best[:, None], slot[None, :], 2147483647), axis=1)
                better = chunk_best > best
                best_slot = tl.where(better, chunk_slot, best_slot)
                best = tl.where(better, chunk_best, best)
            tl.store(owner_ptr + seg_start + rank, tl.where(member, best_slot, -1), mask=rank_ok)

    @triton.jit
    def _mean_kernel(
        x_ptr,
        out_ptr,
        rest_ptr,
        owner_ptr,
        cu_ptr,
        seg_info_ptr,
        stride_xn,
        stride_xd,
        feat_dim,
        BLOCK_R: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_D: tl.constexpr,
        IEEE_DOT: tl.constexpr,
        UPCAST: tl.constexpr,
    ):
        seg = tl.program_id(0)
        # int64 addressing, as in _assign_kernel: token x row stride may pass 2**31.
        feats = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
        feat_ok = feats < feat_dim
        seg_start = tl.load(cu_ptr + seg)
        num_rest = tl.load(seg_info_ptr + seg * 3)
        stride = tl.load(seg_info_ptr + seg * 3 + 1)
        num_targets = tl.load(seg_info_ptr + seg * 3 + 2)
        lanes = tl.arange(0, BLOCK_R)
        for j0 in range(0, num_targets, BLOCK_C):
            slot = j0 + tl.arange(0, BLOCK_C)
            slot_ok = slot < num_targets
            total = tl.zeros([BLOCK_C, BLOCK_D], tl.float32)
            count = tl.zeros([BLOCK_C], tl.float32)
            for r0 in range(0, num_rest, BLOCK_R):
                rank = r0 + lanes
                rank_ok = rank < num_rest
                owner = tl.load(owner_ptr + seg_start + rank, mask=rank_ok, other=-1)
                tok = tl.load(rest_ptr + seg_start + rank, mask=rank_ok, other=0).to(tl.int64)
                rows = tl.load(
                    x_ptr + tok[:, None] * stride_xn + feats[None, :] * stride_xd,
                    mask=rank_ok[:, None] & feat_ok[None, :],
                    other=0.0,
                )
                # A 0/1 matrix times the rows: exact products, fp32 accumulation, fixed order.
                onehot = owner[None, :] == slot[:, None]
                # Through float32: the interpreter turns bool -> bfloat16 casts into garbage.
                weights = tl.where(onehot, 1.0, 0.0)
                total += _tile_dot(weights.to(rows.dtype), rows, IEEE_DOT, UPCAST)
                count += tl.sum(weights, axis=1)
            target_tok = tl.load(rest_ptr + seg_start + slot * stride, mask=slot_ok, other=0).to(tl.int64)
            io_mask = slot_ok[:, None] & feat_ok[None, :]
            base = tl.load(
                x_ptr + target_tok[:, None] * stride_xn + feats[None, :] * stride_xd, mask=io_mask, other=0.0
            ).to(tl.float32)
            merged = tl.where(count[:, None] > 0, base + total / tl.maximum(count, 1.0)[:, None], base)
            tl.store(
                out_ptr + target_tok[:, None] * feat_dim + feats[None, :],
                merged.to(out_ptr.dtype.element_ty),
                mask=io_mask,
            )


def _device_capacities(
    cu_seqlens: torch.Tensor, context_frac: float, num_targets: torch.Tensor | None
) -> torch.Tensor:
    """Per segment the target count C as int32, without a host read: max(int(context_frac * n), 1)
    (in float64 like the Python expression), or ``num_targets`` clamped to [0, n] (more targets than
    tokens change nothing, and the clamp keeps the kernel's int32 arithmetic in range)."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int64)
    if num_targets is None:
        return torch.floor(lengths.to(torch.float64) * context_frac).clamp_min(1).to(torch.int32)
    return torch.minimum(num_targets.to(torch.int64).clamp_min(0), lengths).to(torch.int32)


def _key_norms(keys: torch.Tensor) -> torch.Tensor:
    # The kernel divides the keys by these, as normalize does: keys that are exact multiples of each
    # other then stay exact ties (an inverse-norm product would round them apart).
    return torch.linalg.vector_norm(keys.to(torch.float32), dim=1).clamp_min(_NORM_EPS)


def _triton_blocks(device: torch.device) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(BLOCK_R, BLOCK_C, BLOCK_K) of _assign_kernel and (BLOCK_R, BLOCK_C, BLOCK_D) of _mean_kernel.

    On CUDA, tiles that compile without a stack frame for sm_80 and sm_90 (checked with the Triton
    wheel's ptxas): the float32 dots are FMA loops there, and a 32-target chunk cost _mean_kernel 3.6 KB
    of stack on sm_80 (float32 x) and _assign_kernel 8 bytes with 64 members a chunk. 16 targets a
    chunk also covers a whole slice's targets at the paper's 5 % of 256 tokens."""
    if interpreter_tiles(device):
        return (16, 16, 16), (16, 16, 32)  # the interpreter runs tiles in numpy: keep them small
    return (32, 16, 32), (64, 16, 64)


def _merge_triton(
    x: torch.Tensor,
    keys: torch.Tensor,
    keep: torch.Tensor,
    cu_seqlens: torch.Tensor,
    context_frac: float,
    num_targets: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    num_tokens, feat_dim = x.shape
    num_segments = cu_seqlens.numel() - 1
    (assign_r, assign_c, block_k), (mean_r, mean_c, block_d) = _triton_blocks(x.device)
    x_out = torch.empty((num_tokens, feat_dim), device=x.device, dtype=x.dtype)
    x_out.copy_(x)
    rest = torch.empty(num_tokens, device=x.device, dtype=torch.int32)
    owner = torch.empty(num_tokens, device=x.device, dtype=torch.int32)
    target_flag = torch.zeros(num_tokens, device=x.device, dtype=torch.uint8)
    seg_info = torch.empty((num_segments, 3), device=x.device, dtype=torch.int32)
    capacity = _device_capacities(cu_seqlens, context_frac, num_targets)
    _assign_kernel[(num_segments,)](
        keep.to(torch.uint8), keys, _key_norms(keys), cu_seqlens,
        capacity, rest, owner, target_flag, seg_info,
        keys.stride(0), keys.stride(1), keys.shape[1],
        BLOCK_R=assign_r, BLOCK_C=assign_c, BLOCK_K=block_k,
    )  # fmt: skip
    if feat_dim > 0:
        grid = (num_segments, (feat_dim + block_d - 1) // block_d)
        _mean_kernel[grid](
            x, x_out, rest, owner, cu_seqlens, seg_info,
            x.stride(0), x.stride(1), feat_dim,
            BLOCK_R=mean_r, BLOCK_C=mean_c, BLOCK_D=block_d, IEEE_DOT=x.dtype == torch.float32,
            UPCAST=_bf16_interpreted(x),
        )  # fmt: skip
    return x_out, keep | target_flag.to(torch.bool)


def _merge_cpp(
    x: torch.Tensor,
    keys: torch.Tensor,
    keep: torch.Tensor,
    cu_seqlens: torch.Tensor,
    context_frac: float,
    num_targets: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    targets64 = None if num_targets is None else num_targets.to(torch.int64).contiguous()
    x_out, keep_out = _C.merge_tokens(x, keys, keep, cu_seqlens, context_frac, targets64)
    return x_out.to(x.dtype), keep_out


# Elements of one padded chunk (segments x tokens x (channels + targets)): bounds the torch path's memory.
_TORCH_CHUNK_ELEMENTS = 1 << 23


def _merge_torch_chunk(x, unit, keep, starts, lengths, capacities, x_out, keep_out):
    """Segments ``starts``/``lengths`` with at most ``capacities`` targets each (host ints, each in
    [1, length]) padded to their longest: one batched pass."""
    device = x.device
    length_t = torch.tensor(lengths, device=device)
    max_len = max(lengths)
    positions = torch.arange(max_len, device=device)
    valid = positions[None, :] < length_t[:, None]
    tokens = torch.where(valid, torch.tensor(starts, device=device)[:, None] + positions, 0)
    unkept = valid & ~keep[tokens]
    rank = torch.cumsum(unkept, dim=1) - 1
    num_rest = unkept.sum(dim=1)
    capacity = torch.tensor(capacities, device=device)
    stride = torch.clamp(num_rest // capacity, min=1)
    num_targets = torch.minimum(capacity, (num_rest + stride - 1) // stride)
    is_target = unkept & (rank % stride[:, None] == 0) & (rank < (num_targets * stride)[:, None])
    is_member = unkept & ~is_target
    max_targets = max(capacities)
    # Target tokens by slot; non-targets scatter into a spare last column that is dropped.
    slot = torch.where(is_target, rank // stride[:, None], max_targets)
    target_tok = torch.zeros((len(starts), max_targets + 1), dtype=tokens.dtype, device=device)
    target_tok.scatter_(1, slot, torch.where(is_target, tokens, 0))
    target_tok = target_tok[:, :max_targets]
    slot_ok = torch.arange(max_targets, device=device)[None, :] < num_targets[:, None]

    sim = torch.matmul(unit[tokens], unit[target_tok].transpose(1, 2))
    sim = sim.masked_fill(~slot_ok[:, None, :], float("-inf"))
    owner = sim.argmax(dim=2)  # first maximum: the earlier target wins a tie
    onehot = (owner[:, :, None] == torch.arange(max_targets, device=device)) & is_member[:, :, None]
    onehot = onehot.to(torch.float32)
    totals = torch.matmul(onehot.transpose(1, 2), x[tokens].to(torch.float32))
    counts = onehot.sum(dim=1)
    merged = x[target_tok].to(torch.float32) + totals / counts.clamp_min(1)[:, :, None]
    write = slot_ok & (counts > 0)
    x_out[target_tok[write]] = merged[write].to(x_out.dtype)
    keep_out[tokens[is_target]] = True


def _host_capacities(offsets: list[int], context_frac: float, num_targets: torch.Tensor | None) -> list[int]:
    """Per segment the target count C, clamped to [0, n] (more targets than tokens change nothing)."""
    lengths = [e - s for s, e in zip(offsets[:-1], offsets[1:])]
    if num_targets is None:
        return [min(max(int(context_frac * n), 1), n) for n in lengths]
    return [min(max(c, 0), n) for c, n in zip(num_targets.tolist(), lengths, strict=True)]


def _merge_torch(
    x: torch.Tensor,
    keys: torch.Tensor,
    keep: torch.Tensor,
    cu_seqlens: torch.Tensor,
    context_frac: float,
    num_targets: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    x_out = x.contiguous().clone()
    keep_out = keep.clone()
    unit = torch.nn.functional.normalize(keys.to(torch.float32), dim=1, eps=_NORM_EPS)
    offsets = cu_seqlens.tolist()
    capacities = _host_capacities(offsets, context_frac, num_targets)
    # A segment without tokens or without targets has nothing to merge.
    segments = [(s, e - s, c) for s, e, c in zip(offsets[:-1], offsets[1:], capacities) if c > 0]
    per_token = keys.shape[1] + x.shape[1] + 1
    first = 0
    while first < len(segments):
        last, longest, targets = first, 0, 0
        while last < len(segments):
            longest = max(longest, segments[last][1])
            targets = max(targets, segments[last][2])
            if (
                last > first
                and (last - first + 1) * longest * (per_token + 2 * targets) > _TORCH_CHUNK_ELEMENTS
            ):
                break
            last += 1
        starts, lengths, chunk_capacities = zip(*segments[first:last], strict=True)
        _merge_torch_chunk(x, unit, keep, list(starts), list(lengths), list(chunk_capacities), x_out, keep_out)
        first = last
    return x_out, keep_out


# ------------------------------------------------------------------------------------ registered op
_KERNELS = {"triton": _merge_triton, "cpp": _merge_cpp, "torch": _merge_torch}


@torch.library.custom_op("medpruner::merge_tokens", mutates_args=())
def _merge_op(
    x: torch.Tensor,
    keys: torch.Tensor,
    keep: torch.Tensor,
    cu_seqlens: torch.Tensor,
    context_frac: float,
    num_targets: torch.Tensor | None,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _KERNELS[backend](x, keys, keep, cu_seqlens, context_frac, num_targets)


@_merge_op.register_fake
def _(x, keys, keep, cu_seqlens, context_frac, num_targets, backend):
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(keep)


def _validate(x, keys, keep, cu_seqlens, context_frac, num_targets):
    _validation.check_tensor(_OP, "x", x, _X_DTYPES)
    _validation.check_tensor(_OP, "keys", keys, _validation.FLOAT_DTYPES)
    _validation.check_tensor(_OP, "keep", keep, (torch.bool,))
    if x.dim() != 2:
        raise ValueError(f"{_OP}: x must be [N, D], got shape {tuple(x.shape)}")
    num_tokens = x.shape[0]
    if keys.dim() != 2 or keys.shape[0] != num_tokens:
        raise ValueError(
            f"{_OP}: keys must be [N, Dk] with N={num_tokens} (x's rows), got {tuple(keys.shape)}"
        )
    if keys.shape[1] == 0:
        raise ValueError(f"{_OP}: keys needs at least one channel, got shape {tuple(keys.shape)}")
    if keep.shape != (num_tokens,):
        raise ValueError(f"{_OP}: keep must be [N] with N={num_tokens} (x's rows), got {tuple(keep.shape)}")
    for name, t in (("keys", keys), ("keep", keep)):
        if t.device != x.device:
            raise ValueError(f"{_OP}: {name} is on {t.device} but x is on {x.device}")
    if isinstance(context_frac, bool) or not isinstance(context_frac, (int, float)):
        raise TypeError(f"{_OP}: context_frac must be a Python float, got {type(context_frac).__name__}")
    if not math.isfinite(context_frac) or context_frac < 0:
        raise ValueError(f"{_OP}: context_frac must be finite and >= 0, got {context_frac}")
    cu_seqlens = _validation.check_cu_seqlens(_OP, cu_seqlens, num_tokens, x.device)
    if num_targets is not None:
        _validation.check_count_tensor(_OP, "num_targets", num_targets, cu_seqlens.shape[0] - 1, "segment",
                                       x.device, "x")
        _validation.check_or_defer((num_targets < 0).any(), f"{_OP}: num_targets must be >= 0 in every segment")
    _validation.check_finite(_OP, "x", x)
    _validation.check_finite(_OP, "keys", keys)
    return cu_seqlens, float(context_frac)


def merge_tokens(
    x: torch.Tensor,
    keys: torch.Tensor,
    keep: torch.Tensor,
    *,
    cu_seqlens: torch.Tensor | None = None,
    context_frac: float = 0.05,
    num_targets: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge every pruned token of a segment into its most similar "contextual" token.

    Args:
        x: ``[N, D]`` float32/float16/bfloat16 token features (LLM space, after the projector).
        keys: ``[N, Dk]`` float, the tokens' keys (head-averaged) used for the similarity.
        keep: bool ``[N]``, the tokens kept by the nucleus selection.
        cu_seqlens: int32 ``[B+1]`` segment offsets (slices); ``None``: one segment.
        context_frac: per segment of n tokens, ``C = max(int(context_frac * n), 1)`` targets.
        num_targets: int32/int64 ``[B]`` on ``x``'s device, or None: per segment the number of targets
            ``C``, replacing the ``context_frac`` rule (the fixed token budget). ``C = 0``: no target
            and no merge in that segment (its rows and ``keep`` pass through); ``C`` above the unkept
            count makes every unkept token a target. Negative values are a ValueError (deferred on
            CUDA).
        backend: ``"auto"`` | ``"triton"`` | ``"cpp"`` | ``"torch"``.

    Math, per segment: ``R`` = unkept tokens ascending; targets ``T`` = the first ``C`` of
    ``R[::max(1, len(R) // C)]``; every other token of ``R`` joins ``argmax_t cos(keys[r], keys[t])``
    (ties: the earlier target); ``x_out[t] = x[t] + mean(x[members of t])`` (unchanged without members).

    Returns:
        ``(x_out, keep_out)``: ``x_out`` ``[N, D]`` in ``x.dtype`` (contiguous, computed in float32),
        ``keep_out = keep | targets``. Token order never changes; filter with ``x_out[keep_out]``.
    """
    cu_seqlens, context_frac = _validate(x, keys, keep, cu_seqlens, context_frac, num_targets)
    chosen = resolve_backend(_OP, x.device, backend, cpp_ops=CPP_OPS)
    return call_op(_merge_op, _KERNELS, chosen, x, keys, keep, cu_seqlens, context_frac, num_targets)
