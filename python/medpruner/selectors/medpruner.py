"""MedPruner: IAF drops near-duplicate slices, DINS keeps each kept slice's attention nucleus and merges
the rest into contextual tokens; adaptive (``medpruner``) or at a fixed budget (``medpruner_budget``).

Both run the package's kernels (``iaf_select``, ``nucleus_select``, ``merge_tokens``) on the tokens of
the kept slices only, as the fast mode does (a dropped slice is not encoded, so it keeps no token).
"""

from __future__ import annotations

import torch

from medpruner.config import budget_split, context_targets
from medpruner.selectors.base import (
    check_inputs,
    finish,
    kept_slice_tokens,
    register,
    uniform_tokens_per_slice,
)
from medpruner_kernels import iaf_select, merge_tokens, nucleus_select

# Paper-faithful defaults (DESIGN.md): gamma on the [-1, 1] pixel scale, tau, context_frac.
GAMMA = 0.05
TAU = 0.9
CONTEXT_FRAC = 0.05


def iaf_stage(method: str, slice_pixels, gamma: float, backend: str) -> torch.Tensor:
    """bool ``[S]``: the slices IAF keeps (``gamma`` on the [-1, 1] scale of ``slice_pixels``)."""
    if slice_pixels is None:
        raise ValueError(f"{method}: slice_pixels is required for the IAF slice stage")
    return iaf_select(slice_pixels, gamma, backend=backend)


def _scatter(index, sub_keep, sub_features, features, n, device):
    token_keep = torch.zeros(n, dtype=torch.bool, device=device)
    token_keep[index] = sub_keep
    if features is None or sub_features is None:
        return token_keep, features
    out = features.clone()
    out[index] = sub_features.to(features.dtype)
    return token_keep, out


def dins_stage(scores, keys, features, slice_cu, slice_keep, *, tau, temperature, merge, context_frac, backend):
    """Adaptive DINS (+ merge) over the kept slices -> (token_keep ``[N]``, features)."""
    index, sub_cu = kept_slice_tokens(slice_keep, slice_cu)
    sub_keep = nucleus_select(scores[index], tau, temperature=temperature, cu_seqlens=sub_cu, backend=backend)
    sub_features = None
    if merge and index.numel():
        # Without features the merge still decides which contextual targets are kept; keys stand in as x.
        x = keys[index] if features is None else features[index]
        sub_features, sub_keep = merge_tokens(
            x, keys[index], sub_keep, cu_seqlens=sub_cu, context_frac=context_frac, backend=backend
        )
    return _scatter(index, sub_keep, sub_features if features is not None else None, features, scores.shape[0],
                    scores.device)


def budget_stage(scores, keys, features, slice_cu, slice_keep, budget, *, temperature, merge, context_frac, backend):
    """Fixed-budget DINS (+ merge) over the kept slices (DESIGN.md "Fixed token budget")."""
    method = "medpruner_budget"
    n = uniform_tokens_per_slice(method, slice_cu, slice_keep)
    k = int(slice_keep.sum())
    index, sub_cu = kept_slice_tokens(slice_keep, slice_cu)
    if k == 0 or n == 0:
        return _scatter(index, torch.zeros(0, dtype=torch.bool, device=scores.device), None, features,
                        scores.shape[0], scores.device)
    per_slice = budget_split(budget, k, n)
    targets = [context_targets(b, n, context_frac) if merge else 0 for b in per_slice]
    top = torch.tensor([b - c for b, c in zip(per_slice, targets)], dtype=torch.int32, device=scores.device)
    sub_keep = nucleus_select(scores[index], 1.0, temperature=temperature, cu_seqlens=sub_cu, counts=top,
                              backend=backend)
    sub_features = None
    if merge:
        x = keys[index] if features is None else features[index]
        num_targets = torch.tensor(targets, dtype=torch.int32, device=scores.device)
        sub_features, sub_keep = merge_tokens(x, keys[index], sub_keep, cu_seqlens=sub_cu, num_targets=num_targets,
                                              backend=backend)
    return _scatter(index, sub_keep, sub_features if features is not None else None, features, scores.shape[0],
                    scores.device)


@register("medpruner", budgeted=False, slice_stage=True, token_stage=True,
          description="IAF slice filtering + adaptive DINS nucleus + contextual merge (the paper)")
def select_medpruner(
    scores, keys, features, slice_cu, budget=None, *, slice_pixels=None, generator=None,
    gamma=GAMMA, tau=TAU, temperature=None, merge=True, context_frac=CONTEXT_FRAC, backend="auto",
):
    """Adaptive MedPruner; ``budget`` is ignored (its kept count is the budget of the others).
    ``temperature``: the DINS softmax temperature (None: masses ``scores / sum``)."""
    check_inputs("medpruner", scores, keys, features, slice_cu, slice_pixels)
    slice_keep = iaf_stage("medpruner", slice_pixels, gamma, backend)
    token_keep, out = dins_stage(scores, keys, features, slice_cu, slice_keep, tau=tau, temperature=temperature,
                                 merge=merge, context_frac=context_frac, backend=backend)
    return finish(slice_keep, token_keep, out, slice_cu)


@register("medpruner_budget", budgeted=True, slice_stage=True, token_stage=True,
          description="IAF + a fixed token budget split evenly over the kept slices, DINS mass order + merge")
def select_medpruner_budget(
    scores, keys, features, slice_cu, budget, *, slice_pixels=None, generator=None,
    gamma=GAMMA, temperature=None, merge=True, context_frac=CONTEXT_FRAC, backend="auto",
):
    """MedPruner at a fixed budget: an int (tokens per volume) or a float in (0, 1] (a fraction of the
    kept slices' tokens), split by ``budget_split``; every kept slice must have the same token count."""
    method = "medpruner_budget"
    check_inputs(method, scores, keys, features, slice_cu, slice_pixels)
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise ValueError(f"{method}: budget must be an int >= 1 or a float in (0, 1], got {budget!r}")
    if (isinstance(budget, float) and not 0.0 < budget <= 1.0) or (isinstance(budget, int) and budget < 1):
        raise ValueError(f"{method}: budget must be an int >= 1 or a float in (0, 1], got {budget!r}")
    slice_keep = iaf_stage(method, slice_pixels, gamma, backend)
    token_keep, out = budget_stage(scores, keys, features, slice_cu, slice_keep, budget, temperature=temperature,
                                   merge=merge, context_frac=context_frac, backend=backend)
    return finish(slice_keep, token_keep, out, slice_cu)
