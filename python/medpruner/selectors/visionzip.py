"""VisionZip-style: dominant tokens by received attention plus contextual tokens merged from the rest.

Over the whole volume with a budget of B tokens: ``C = max(1, round(B * context_ratio))`` contextual
tokens (0 when B = 1; VisionZip's default split is 54 dominant : 10 contextual) and the ``B - C`` tokens
with the highest scores (ties: lower index) as dominant ones. The rest, ascending, give the C targets at
stride ``max(1, len(rest) // C)``; every other token joins the target whose key has the highest cosine
similarity (ties: the earlier target), and a target's feature becomes the mean of itself and its
members (VisionZip averages; MedPruner's merge adds the members' mean to the target instead).
"""

from __future__ import annotations

import torch

from medpruner.selectors.base import register, resolve_budget, top_k_mask

CONTEXT_RATIO = 10 / 64


@register("visionzip", budgeted=True, slice_stage=False, token_stage=True,
          description="VisionZip-style dominant (top attention) + contextual (merged) tokens over the volume")
def tokens_visionzip(scores, keys, features, slice_cu, budget, *, generator=None, context_ratio=CONTEXT_RATIO):
    method = "visionzip"
    if not 0.0 <= context_ratio < 1.0:
        raise ValueError(f"{method}: context_ratio must be in [0, 1), got {context_ratio}")
    budget = resolve_budget(method, budget, scores.shape[0])
    contextual = max(1, round(budget * context_ratio)) if budget > 1 and context_ratio > 0 else 0
    keep = top_k_mask(scores, budget - contextual)
    rest = (~keep).nonzero().flatten()
    if contextual == 0 or rest.numel() == 0:
        return keep, features
    targets = rest[:: max(1, rest.numel() // contextual)][:contextual]
    is_target = torch.zeros_like(keep)
    is_target[targets] = True
    keep = keep | is_target
    out = features
    members = rest[~is_target[rest]]
    if features is not None and members.numel():
        compute = torch.float64 if features.dtype == torch.float64 else torch.float32
        unit = torch.nn.functional.normalize(keys.to(compute), dim=1)
        owner = (unit[members] @ unit[targets].T).argmax(dim=1)
        x = features.to(compute)
        sums = x[targets].index_add(0, owner, x[members])
        counts = torch.bincount(owner, minlength=targets.numel()).to(compute) + 1
        out = features.clone()
        out[targets] = (sums / counts.unsqueeze(1)).to(features.dtype)
    return keep, out
