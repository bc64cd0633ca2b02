"""Plain-torch reference implementations: readable, float64-capable, the truth every kernel is tested
against, and the last-resort CPU path. They follow ../shared/DESIGN.md literally (Python loops over
slices are fine here; speed is the kernels' job). Inputs are assumed validated by the public ops.
"""

from __future__ import annotations

import torch


def segments(cu_seqlens: torch.Tensor) -> list[tuple[int, int]]:
    """``[B+1]`` offsets -> list of (start, end) row ranges."""
    offsets = cu_seqlens.tolist()
    return list(zip(offsets[:-1], offsets[1:], strict=True))


# --------------------------------------------------------------------------------------------- IAF
def iaf_select(slices: torch.Tensor, gamma: float, cu_seqlens: torch.Tensor, dtype=torch.float64):
    """``slices``: ``[N, P]`` (flattened slices of all volumes); returns (keep ``[N]`` bool,
    distance ``[N]`` in ``dtype``: each slice's mean |.| distance to the anchor it was compared with,
    0 for a volume's first slice).

    keep[0] = True; anchor = 0; for s >= 1: d = mean|x[s] - x[anchor]|; keep if d > gamma (then anchor = s).
    """
    x = slices.to(dtype)
    keep = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    distance = torch.zeros(x.shape[0], dtype=dtype, device=x.device)
    for start, end in segments(cu_seqlens):
        if end <= start:
            continue
        keep[start] = True
        anchor = start
        for s in range(start + 1, end):
            d = (x[s] - x[anchor]).abs().mean()
            distance[s] = d
            if d.item() > gamma:
                keep[s] = True
                anchor = s
    return keep, distance


def iaf_local_select(slices: torch.Tensor, gamma: float, cu_seqlens: torch.Tensor, block: int, dtype=torch.float64):
    """Local-change IAF: as :func:`iaf_select` with d = the largest mean |x[s] - x[anchor]| over the
    blocks of ``block`` contiguous elements of each flattened slice."""
    x = slices.to(dtype)
    keep = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    distance = torch.zeros(x.shape[0], dtype=dtype, device=x.device)
    for start, end in segments(cu_seqlens):
        if end <= start:
            continue
        keep[start] = True
        anchor = start
        for s in range(start + 1, end):
            d = (x[s] - x[anchor]).abs().reshape(-1, block).mean(dim=1).max()
            distance[s] = d
            if d.item() > gamma:
                keep[s] = True
                anchor = s
    return keep, distance


def anchor_distances(slices: torch.Tensor, keep: torch.Tensor, cu_seqlens: torch.Tensor, dtype=torch.float64):
    """Per slice, mean |x[s] - x[a]| where a is the last kept slice before s in its volume (0 for the
    first slice of a volume). ``keep[start]`` is treated as True whatever it holds."""
    x = slices.to(dtype)
    distance = torch.zeros(x.shape[0], dtype=dtype, device=x.device)
    for start, end in segments(cu_seqlens):
        anchor = start
        for s in range(start + 1, end):
            distance[s] = (x[s] - x[anchor]).abs().mean()
            if bool(keep[s]):
                anchor = s
    return distance


# ---------------------------------------------------------------------------------------- nucleus
def nucleus_probabilities(scores: torch.Tensor, temperature: float | None, dtype=torch.float64):
    """One slice's token masses: softmax(scores / T) or scores / sum(scores) (all-zero -> zeros)."""
    s = scores.to(dtype)
    if temperature is not None:
        return torch.softmax(s / temperature, dim=0)
    total = s.sum()
    return s / total if total > 0 else torch.zeros_like(s)


def nucleus_count(p: torch.Tensor, tau: float, min_keep: int, max_keep: int | None) -> int:
    """Number of tokens kept in one slice, given its masses ``p`` (sum 1, or all 0)."""
    n = p.numel()
    upper = n if max_keep is None else min(max_keep, n)
    if n == 0:
        return 0
    if tau >= 1.0:
        count = n
    elif float(p.sum()) == 0.0:
        count = min_keep
    else:
        ordered = torch.sort(p, descending=True, stable=True).values
        cumulative = torch.cumsum(ordered, dim=0)
        # smallest prefix whose sum reaches tau: 1 + (entries strictly below tau), at most n
        count = min(int((cumulative < tau).sum()) + 1, n)
    return max(min(max(count, min_keep), upper), 0)


def nucleus_select(
    scores: torch.Tensor,
    tau: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    temperature: float | None = None,
    min_keep: int = 1,
    max_keep: int | None = None,
    counts: torch.Tensor | None = None,
    dtype=torch.float64,
) -> torch.Tensor:
    """``scores``: flat ``[total_tokens]``; ``tau``: ``[B]`` per segment. Returns the keep mask
    ``[total_tokens]`` in the original order: per segment the ``count`` highest masses (ties: lower
    index first), where ``count`` is the smallest prefix of the sorted masses whose sum is >= tau,
    clamped to [min_keep, max_keep].

    With ``counts`` (``[B]``), segment b keeps exactly its ``counts[b]`` highest masses instead. The
    masses increase strictly with the score (softmax and scores / sum alike), so the exact mass order
    is the score order; the scores are ranked, since float64 masses underflow to false ties (a sink
    token 1000 above the rest leaves every other softmax mass at 0.0)."""
    keep = torch.zeros(scores.shape[0], dtype=torch.bool, device=scores.device)
    for b, (start, end) in enumerate(segments(cu_seqlens)):
        if end <= start:
            continue
        if counts is not None:
            # + 0.0 turns -0.0 into +0.0: equal scores, a tie.
            order = torch.sort(scores[start:end].to(dtype) + 0.0, descending=True, stable=True).indices
            keep[start + order[: int(counts[b])]] = True
            continue
        p = nucleus_probabilities(scores[start:end], temperature, dtype)
        count = nucleus_count(p, float(tau[b]), min_keep, max_keep)
        order = torch.sort(p, descending=True, stable=True).indices
        keep[start + order[:count]] = True
    return keep


# ------------------------------------------------------------------------------ attention importance
def attention_importance(
    q: torch.Tensor,
    k: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    scale: float | None = None,
    group: int = 1,
    dtype=torch.float64,
) -> torch.Tensor:
    """``q, k``: ``[N, H, Dh]``. Per segment, softmax(q k^T * scale) over keys, averaged over heads and
    summed over the segment's queries: the attention each key receives (a segment sums to its length).
    Then the mean over consecutive groups of ``group`` tokens -> ``[N // group]``. Materialises the
    dense matrix on purpose: this is the readable truth, not a kernel."""
    n, _, head_dim = q.shape
    scale = head_dim**-0.5 if scale is None else scale
    received = torch.zeros(n, dtype=dtype, device=q.device)
    for start, end in segments(cu_seqlens):
        if end <= start:
            continue
        qs = q[start:end].to(dtype).transpose(0, 1)
        ks = k[start:end].to(dtype).transpose(0, 1)
        probs = torch.softmax(qs @ ks.transpose(1, 2) * scale, dim=-1)
        received[start:end] = probs.mean(dim=0).sum(dim=0)
    return received.reshape(-1, group).mean(dim=1) if group > 1 else received


# ------------------------------------------------------------------------------------------- merge
def merge_tokens(
    x: torch.Tensor,
    keys: torch.Tensor,
    keep: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    context_frac: float = 0.05,
    num_targets: torch.Tensor | None = None,
    dtype=torch.float64,
):
    """Contextual merge of the tokens not in ``keep``, per segment of n tokens: R = unkept tokens
    ascending; C = max(int(context_frac * n), 1) targets (or C = num_targets[b]; C = 0 merges nothing
    in that segment) taken at stride max(1, len(R) // C) from R;
    every other token of R joins the target whose L2-normalised key has the highest cosine similarity
    (ties: the earlier target); x_out[t] = x[t] + mean(x[members of t]). Returns (x_out in ``dtype``,
    keep_out = keep | targets). Token order never changes."""
    x_out = x.to(dtype).clone()
    keep_out = keep.clone()
    for b, (start, end) in enumerate(segments(cu_seqlens)):
        n = end - start
        if n == 0:
            continue
        rest = (~keep[start:end]).nonzero().flatten() + start
        if rest.numel() == 0:
            continue
        count = max(int(context_frac * n), 1) if num_targets is None else int(num_targets[b])
        if count == 0:
            continue
        stride = max(1, rest.numel() // count)
        targets = rest[::stride][:count]
        is_target = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        is_target[targets] = True
        members = rest[~is_target[rest]]
        keep_out[targets] = True
        if members.numel() == 0:
            continue
        unit = torch.nn.functional.normalize(keys.to(dtype), dim=-1)
        similarity = unit[members] @ unit[targets].T
        owner = similarity.argmax(dim=1)  # torch returns the first maximal index on ties
        features = x.to(dtype)
        for j, t in enumerate(targets.tolist()):
            mine = members[owner == j]
            if mine.numel():
                x_out[t] = features[t] + features[mine].mean(dim=0)
    return x_out, keep_out
