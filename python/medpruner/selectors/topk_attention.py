"""Top-k attention: the ``budget`` tokens that receive the most attention, over the whole volume."""

from __future__ import annotations

from medpruner.selectors.base import all_kept, check_inputs, finish, register, resolve_budget, top_k_mask


@register("topk", budgeted=True, slice_stage=False, token_stage=True,
          description="global top-k tokens by received attention (ties: lower index)")
def select_topk(scores, keys, features, slice_cu, budget, *, slice_pixels=None, generator=None):
    method = "topk"
    check_inputs(method, scores, keys, features, slice_cu, slice_pixels)
    budget = resolve_budget(method, budget, scores.shape[0])
    return finish(all_kept(scores, slice_cu), top_k_mask(scores, budget), features, slice_cu)
