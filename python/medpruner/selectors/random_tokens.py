"""Random tokens: ``budget`` tokens drawn uniformly without replacement over the whole volume (seeded)."""

from __future__ import annotations

import torch

from medpruner.selectors.base import register, resolve_budget


@register("random", budgeted=True, slice_stage=False, token_stage=True,
          description="budget tokens uniformly at random over the volume (seeded generator)")
def tokens_random(scores, keys, features, slice_cu, budget, *, generator=None):
    total = scores.shape[0]
    budget = resolve_budget("random", budget, total)
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    # randperm draws on the generator's device; the CPU default keeps a seed's draw the same everywhere.
    chosen = torch.randperm(total, generator=generator, device=generator.device)[:budget].to(scores.device)
    token_keep = torch.zeros(total, dtype=torch.bool, device=scores.device)
    token_keep[chosen] = True
    return token_keep, features
