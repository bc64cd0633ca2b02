"""No pruning: every slice and every token (the reference run of the audit)."""

from __future__ import annotations

from medpruner.selectors.base import all_tokens, register


@register("none", budgeted=False, slice_stage=False, token_stage=False, description="no pruning")
def tokens_none(scores, keys, features, slice_cu, budget=None, *, generator=None):
    return all_tokens(scores), features
