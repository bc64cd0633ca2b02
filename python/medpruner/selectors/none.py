"""No pruning: every slice and every token (the reference run of the audit)."""

from __future__ import annotations

import torch

from medpruner.selectors.base import all_kept, check_inputs, finish, register


@register("none", budgeted=False, slice_stage=False, token_stage=False, description="no pruning")
def select_none(scores, keys, features, slice_cu, budget=None, *, slice_pixels=None, generator=None):
    check_inputs("none", scores, keys, features, slice_cu, slice_pixels)
    token_keep = torch.ones(scores.shape[0], dtype=torch.bool, device=scores.device)
    return finish(all_kept(scores, slice_cu), token_keep, features, slice_cu)
