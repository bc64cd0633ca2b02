"""Top-k attention: the ``budget`` tokens that receive the most attention, over the whole volume."""

from __future__ import annotations

from medpruner.selectors.base import register, resolve_budget, top_k_mask


@register("topk", budgeted=True, slice_stage=False, token_stage=True,
          description="global top-k tokens by received attention (ties: lower index)")
def tokens_topk(scores, keys, features, slice_cu, budget, *, generator=None):
    budget = resolve_budget("topk", budget, scores.shape[0])
    return top_k_mask(scores, budget), features
