"""Random tokens: ``budget`` tokens drawn uniformly without replacement over the whole volume (seeded)."""

from __future__ import annotations

import torch

from medpruner.selectors.base import all_kept, check_inputs, finish, register, resolve_budget


@register("random", budgeted=True, slice_stage=False, token_stage=True,
          description="budget tokens uniformly at random over the volume (seeded generator)")
def select_random(scores, keys, features, slice_cu, budget, *, slice_pixels=None, generator=None):
    method = "random"
    check_inputs(method, scores, keys, features, slice_cu, slice_pixels)
    total = scores.shape[0]
    budget = resolve_budget(method, budget, total)
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    # randperm draws on the generator's device; the CPU default keeps a seed's draw the same everywhere.
    chosen = torch.randperm(total, generator=generator, device=generator.device)[:budget].to(scores.device)
    token_keep = torch.zeros(total, dtype=torch.bool, device=scores.device)
    token_keep[chosen] = True
    return finish(all_kept(scores, slice_cu), token_keep, features, slice_cu)
