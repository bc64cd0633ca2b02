"""HiPrune-like: anchors (the most attended tokens), their spatial neighbours, then registers.

Every slice is an ``h x w`` grid of n tokens in raster order (``grid``; default the square of side
sqrt(n)). With a budget of B tokens: the ``A = max(1, int(anchor_frac * B))`` highest ``scores`` are the
anchors (ties: lower index); then, anchor by anchor in score order, its 4 neighbours in its slice (up,
down, left, right) that are not chosen yet join while fewer than B are chosen; the remaining places go
to the highest ``register_scores`` among the rest (HiPrune takes them from a deeper layer's attention;
default: ``scores``).
"""

from __future__ import annotations

import math

import torch

from medpruner.selectors.base import register, resolve_budget, top_k_mask, uniform_tokens_per_slice

ANCHOR_FRAC = 0.1
_STEPS = ((-1, 0), (1, 0), (0, -1), (0, 1))


def _grid(method: str, grid, n: int) -> tuple[int, int]:
    if grid is None:
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"{method}: slices of {n} tokens are not square; pass grid=(h, w)")
        return side, side
    h, w = (int(v) for v in grid)
    if h * w != n:
        raise ValueError(f"{method}: grid {h}x{w} does not hold the {n} tokens of a slice")
    return h, w


@register("hiprune", budgeted=True, slice_stage=False, token_stage=True,
          description="HiPrune-like anchors + 4-neighbours + registers over the volume")
def tokens_hiprune(scores, keys, features, slice_cu, budget, *, generator=None, grid=None, anchor_frac=ANCHOR_FRAC,
                   register_scores=None):
    method = "hiprune"
    if not 0.0 <= anchor_frac <= 1.0:
        raise ValueError(f"{method}: anchor_frac must be in [0, 1], got {anchor_frac}")
    if register_scores is not None and register_scores.shape != scores.shape:
        raise ValueError(f"{method}: register_scores must have the shape of scores {tuple(scores.shape)}")
    total = scores.shape[0]
    budget = resolve_budget(method, budget, total)
    n = uniform_tokens_per_slice(method, slice_cu)
    h, w = _grid(method, grid, n)
    order = torch.sort(scores, descending=True, stable=True).indices
    anchors = order[: max(1, int(anchor_frac * budget))]
    keep = torch.zeros(total, dtype=torch.bool, device=scores.device)
    keep[anchors] = True
    position = anchors % n
    row, col = position // w, position % w
    base = anchors - position
    candidates = []
    for dr, dc in _STEPS:
        r, c = row + dr, col + dc
        inside = (r >= 0) & (r < h) & (c >= 0) & (c < w)
        candidates.append(torch.where(inside, base + r * w + c, -1))
    # Rank order: all 4 neighbours of the first anchor, then of the second, ...
    candidates = torch.stack(candidates, dim=1).flatten()
    candidates = candidates[candidates >= 0]
    candidates = candidates[~keep[candidates]]
    ranks = torch.arange(candidates.numel(), device=scores.device)
    first_seen = torch.full((total,), candidates.numel(), dtype=torch.long, device=scores.device)
    first_seen.scatter_reduce_(0, candidates, ranks, reduce="amin")
    neighbours = candidates[first_seen[candidates] == ranks][: budget - anchors.numel()]
    keep[neighbours] = True
    remaining = budget - int(keep.sum())
    if remaining > 0:
        ranked = (scores if register_scores is None else register_scores).to(torch.float64)
        keep |= top_k_mask(ranked.masked_fill(keep, -float("inf")), remaining)
    return keep, features
