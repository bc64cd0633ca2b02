"""Uniform slice sampling: m evenly spaced slices, all their tokens, m matched to the token budget.

With S slices of N tokens in all, ``m = clamp(round(budget * S / N), 1, S)`` (the budget in slices of
average size, so the kept count matches it to within one slice) and slice ``i`` of the m is
``floor((2 i + 1) * S / (2 m))``: the centre of the i-th of m equal stretches.
"""

from __future__ import annotations

import torch

from medpruner.selectors.base import all_tokens, register, resolve_budget


def uniform_slice_indices(num_slices: int, count: int) -> list[int]:
    return [(2 * i + 1) * num_slices // (2 * count) for i in range(count)]


def slices_uniform(slice_pixels, slice_cu, budget, *, generator=None):
    total = int(slice_cu[-1])
    budget = resolve_budget("uniform_slices", budget, total)
    num_slices = slice_cu.numel() - 1
    count = min(max(round(budget * num_slices / total), 1), num_slices) if total else num_slices
    slice_keep = torch.zeros(num_slices, dtype=torch.bool, device=slice_cu.device)
    slice_keep[uniform_slice_indices(num_slices, count)] = True
    return slice_keep


@register("uniform_slices", budgeted=True, slice_stage=True, token_stage=False, slices=slices_uniform,
          description="evenly spaced slices, all their tokens, matched to the budget to within a slice")
def tokens_uniform_slices(scores, keys, features, slice_cu, budget, *, generator=None):
    return all_tokens(scores), features
