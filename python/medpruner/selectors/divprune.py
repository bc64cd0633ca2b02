"""DivPrune: the most diverse ``budget`` tokens, greedy max-min cosine distance over the whole volume.

Distance ``d(i, j) = 1 - cos(v_i, v_j)`` on the features (the keys when no features are given). The
first token is the one farthest from its nearest neighbour (``argmax_i min_{j != i} d(i, j)``); each
next one maximises its distance to the nearest token already chosen. Ties: the lower index. The
distances to the chosen set are updated one row at a time and the first pick is computed in row
chunks, so no ``N x N`` matrix is held.
"""

from __future__ import annotations

import torch

from medpruner.selectors.base import register, resolve_budget

_CHUNK_ELEMENTS = 1 << 24


@register("divprune", budgeted=True, slice_stage=False, token_stage=True,
          description="greedy max-min cosine diversity over the volume's tokens (DivPrune)")
def tokens_divprune(scores, keys, features, slice_cu, budget, *, generator=None):
    method = "divprune"
    total = scores.shape[0]
    budget = resolve_budget(method, budget, total)
    vectors = keys if features is None else features
    compute = torch.float64 if vectors.dtype == torch.float64 else torch.float32
    unit = torch.nn.functional.normalize(vectors.to(compute), dim=1)
    keep = torch.zeros(total, dtype=torch.bool, device=scores.device)
    if budget == 0:
        return keep, features
    nearest = torch.full((total,), float("inf"), dtype=compute, device=scores.device)
    rows = max(1, _CHUNK_ELEMENTS // max(total, 1))
    for start in range(0, total, rows):
        block = 1 - unit[start : start + rows] @ unit.T
        diagonal = torch.arange(block.shape[0], device=block.device)
        block[diagonal, diagonal + start] = float("inf")
        nearest[start : start + rows] = block.min(dim=1).values
    # A lone token has no neighbour: its distance stays inf and it is chosen.
    chosen = int(torch.argmax(nearest))
    keep[chosen] = True
    to_chosen = 1 - unit @ unit[chosen]
    for _ in range(budget - 1):
        chosen = int(torch.argmax(to_chosen.masked_fill(keep, -float("inf"))))
        keep[chosen] = True
        to_chosen = torch.minimum(to_chosen, 1 - unit @ unit[chosen])
    return keep, features
