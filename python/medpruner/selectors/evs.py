"""EVS-like: keep the tokens that changed most since the previous slice, a global top-k.

Every slice has the same n tokens (one grid per volume); token t of slice s > 0 scores
``1 - cos(v[s, t], v[s - 1, t])`` on the features (the keys when no features are given), and every
token of the first slice scores 2, the largest possible distance, so the first slice is kept first. The
``budget`` highest scores over the volume are kept (ties: lower index).
"""

from __future__ import annotations

import torch

from medpruner.selectors.base import register, resolve_budget, top_k_mask, uniform_tokens_per_slice


def change_scores(vectors: torch.Tensor, num_slices: int) -> torch.Tensor:
    compute = torch.float64 if vectors.dtype == torch.float64 else torch.float32
    unit = torch.nn.functional.normalize(vectors.to(compute), dim=1).reshape(num_slices, -1, vectors.shape[1])
    score = torch.full(unit.shape[:2], 2.0, dtype=compute, device=vectors.device)
    score[1:] = 1 - (unit[1:] * unit[:-1]).sum(dim=-1)
    return score.flatten()


@register("evs", budgeted=True, slice_stage=False, token_stage=True,
          description="EVS-like: global top-k of 1 - cosine to the same token of the previous slice")
def tokens_evs(scores, keys, features, slice_cu, budget, *, generator=None):
    method = "evs"
    budget = resolve_budget(method, budget, scores.shape[0])
    uniform_tokens_per_slice(method, slice_cu)
    change = change_scores(keys if features is None else features, slice_cu.numel() - 1)
    return top_k_mask(change, budget), features
