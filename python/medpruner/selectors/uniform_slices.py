"""Uniform slice sampling: m evenly spaced slices, all their tokens, m matched to the token budget.

With S slices of N tokens in all, ``m = clamp(round(budget * S / N), 1, S)`` (the budget in slices of
average size, so the kept count matches it to within one slice) and slice ``i`` of the m is
``floor((2 i + 1) * S / (2 m))``: the centre of the i-th of m equal stretches.
"""

from __future__ import annotations

import torch

from medpruner.selectors.base import check_inputs, finish, register, resolve_budget, slice_of_token


def uniform_slice_indices(num_slices: int, count: int) -> list[int]:
    return [(2 * i + 1) * num_slices // (2 * count) for i in range(count)]


@register("uniform_slices", budgeted=True, slice_stage=True, token_stage=False,
          description="evenly spaced slices, all their tokens, matched to the budget to within a slice")
def select_uniform_slices(scores, keys, features, slice_cu, budget, *, slice_pixels=None, generator=None):
    method = "uniform_slices"
    check_inputs(method, scores, keys, features, slice_cu, slice_pixels)
    total = scores.shape[0]
    budget = resolve_budget(method, budget, total)
    num_slices = slice_cu.numel() - 1
    count = min(max(round(budget * num_slices / total), 1), num_slices) if total else num_slices
    slice_keep = torch.zeros(num_slices, dtype=torch.bool, device=scores.device)
    slice_keep[uniform_slice_indices(num_slices, count)] = True
    return finish(slice_keep, slice_keep[slice_of_token(slice_cu)], features, slice_cu)
