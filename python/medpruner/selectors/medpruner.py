"""MedPruner: IAF drops near-duplicate slices, DINS keeps each kept slice's attention nucleus and merges
the rest into contextual tokens; adaptive (``medpruner``) or at a fixed budget (``medpruner_budget``).

:func:`dins_merge` is the token stage's one implementation (``nucleus_select`` then ``merge_tokens``):
:class:`MedPrunerPolicy`, the policy the HF pipeline and the vLLM plugin run by default, and the two
eval methods call it. The token stage sees the kept slices' tokens only, as in the fast mode (a dropped
slice is not encoded, so it keeps no token).
"""

from __future__ import annotations

import torch

from medpruner.config import budget_split, context_targets
from medpruner.selectors.base import register, uniform_tokens_per_slice
from medpruner.selectors.policy import Policy
from medpruner_kernels import iaf_local_select, iaf_select, merge_tokens, nucleus_select

# Paper-faithful defaults (DESIGN.md): gamma on the [-1, 1] pixel scale, tau, context_frac.
GAMMA = 0.05
TAU = 0.9
CONTEXT_FRAC = 0.05


def iaf_stage(method: str, slice_pixels, gamma: float, backend: str, *, return_distances: bool = False):
    """bool ``[S]``: the slices IAF keeps (``gamma`` on the [-1, 1] scale of ``slice_pixels``); with
    ``return_distances`` also each slice's distance to its anchor."""
    if slice_pixels is None:
        raise ValueError(f"{method}: slice_pixels is required for the IAF slice stage")
    return iaf_select(slice_pixels, gamma, return_distances=return_distances, backend=backend)


def dins_merge(scores, keys, features, slice_cu, *, tau, temperature, merge, context_frac, backend,
               max_seqlen=None, min_keep=1, counts=None, num_targets=None):
    """DINS (``nucleus_select``) and the contextual merge (``merge_tokens``) over the slices of
    ``slice_cu`` -> (keep ``[N]``, features: merged, or the input when there is no merge or no
    features). ``counts`` / ``num_targets``: per slice, the DINS picks and merge targets of the fixed
    budget (None: the nucleus at ``tau`` and the ``context_frac`` rule)."""
    selection = {} if counts is None else {"counts": counts}
    keep = nucleus_select(scores, tau, temperature=temperature, cu_seqlens=slice_cu, max_seqlen=max_seqlen,
                          min_keep=min_keep, backend=backend, **selection)
    if not merge or scores.numel() == 0:
        return keep, features
    # Without features the merge still decides which contextual targets are kept; keys stand in as x.
    x = keys if features is None else features
    targets = {} if num_targets is None else {"num_targets": num_targets}
    merged, keep = merge_tokens(x, keys, keep, cu_seqlens=slice_cu, context_frac=context_frac, backend=backend,
                                **targets)
    return keep, (None if features is None else merged)


# ------------------------------------------------------------------------------------ eval methods
def slices_medpruner(slice_pixels, slice_cu, budget=None, *, generator=None, gamma=GAMMA, backend="auto"):
    return iaf_stage("medpruner", slice_pixels, gamma, backend)


@register("medpruner", budgeted=False, slice_stage=True, token_stage=True, slices=slices_medpruner,
          description="IAF slice filtering + adaptive DINS nucleus + contextual merge (the paper)")
def tokens_medpruner(scores, keys, features, slice_cu, budget=None, *, generator=None, tau=TAU, temperature=None,
                     merge=True, context_frac=CONTEXT_FRAC, backend="auto"):
    """Adaptive MedPruner; ``budget`` is ignored (its kept count is the budget of the others).
    ``temperature``: the DINS softmax temperature (None: masses ``scores / sum``)."""
    return dins_merge(scores, keys, features, slice_cu, tau=tau, temperature=temperature, merge=merge,
                      context_frac=context_frac, backend=backend)


def _check_budget(method: str, budget) -> None:
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise ValueError(f"{method}: budget must be an int >= 1 or a float in (0, 1], got {budget!r}")
    if (isinstance(budget, float) and not 0.0 < budget <= 1.0) or (isinstance(budget, int) and budget < 1):
        raise ValueError(f"{method}: budget must be an int >= 1 or a float in (0, 1], got {budget!r}")


def slices_medpruner_budget(slice_pixels, slice_cu, budget, *, generator=None, gamma=GAMMA, backend="auto"):
    _check_budget("medpruner_budget", budget)
    return iaf_stage("medpruner_budget", slice_pixels, gamma, backend)


@register("medpruner_budget", budgeted=True, slice_stage=True, token_stage=True, slices=slices_medpruner_budget,
          description="IAF + a fixed token budget split evenly over the kept slices, DINS mass order + merge")
def tokens_medpruner_budget(scores, keys, features, slice_cu, budget, *, generator=None, temperature=None,
                            merge=True, context_frac=CONTEXT_FRAC, backend="auto"):
    """MedPruner at a fixed budget: an int (tokens per volume) or a float in (0, 1] (a fraction of the
    kept slices' tokens), split by ``budget_split``; every kept slice must have the same token count."""
    _check_budget("medpruner_budget", budget)
    return budgeted_dins_merge("medpruner_budget", scores, keys, features, slice_cu, budget, budget_split,
                               temperature=temperature, merge=merge, context_frac=context_frac, backend=backend)


def budgeted_dins_merge(method, scores, keys, features, slice_cu, budget, shares, *, temperature, merge,
                        context_frac, backend):
    """DINS mass order and the merge at per-slice shares of ``budget``: ``shares(budget, k, n)`` gives
    the tokens of each of the k kept slices of n tokens (every kept slice must have n), of which the
    ``context_targets`` rule's are merge targets. The token stage of every budgeted MedPruner method."""
    n = uniform_tokens_per_slice(method, slice_cu)
    k = slice_cu.numel() - 1
    if k == 0 or n == 0:
        return torch.zeros(scores.shape[0], dtype=torch.bool, device=scores.device), features
    per_slice = shares(budget, k, n)
    targets = [context_targets(b, n, context_frac) if merge else 0 for b in per_slice]
    top = torch.tensor([b - c for b, c in zip(per_slice, targets, strict=True)], dtype=torch.int32,
                       device=scores.device)
    num_targets = torch.tensor(targets, dtype=torch.int32, device=scores.device)
    return dins_merge(scores, keys, features, slice_cu, tau=1.0, temperature=temperature, merge=merge,
                      context_frac=context_frac, backend=backend, counts=top, num_targets=num_targets)


# ----------------------------------------------------------------------------------- the pipeline
class MedPrunerPolicy(Policy):
    """The paper's method as the pipeline runs it on a whole batch, sync-free: IAF over every volume
    (``config.gamma``), then DINS and the merge over the encoded slices (``config.tau``,
    ``context_frac``, ``min_keep``), at the config's fixed budget when it has one. The policy of
    ``apply_medpruner``, ``prune_inputs`` and the vLLM plugin."""

    name = "medpruner"

    def select_slices(self, slice_pixels, volume_cu, *, config, max_seqlen=None, iaf_block=None, **context):
        """IAF by the config's rule (``iaf``: the mean change against gamma, or any block's against
        ``gamma_local``, blocks of ``iaf_block`` values); with ``allocation="change"`` also each slice's
        change to its anchor, which splits the budget."""
        change = config.allocation == "change"
        if config.iaf == "local":
            return iaf_local_select(slice_pixels, float(config.gamma_local), block=iaf_block, cu_seqlens=volume_cu,
                                    max_seqlen=max_seqlen, return_distances=change, backend=config.backend)
        return iaf_select(slice_pixels, float(config.gamma), cu_seqlens=volume_cu, max_seqlen=max_seqlen,
                          return_distances=change, backend=config.backend)

    def select_tokens(self, scores, keys, features, slice_cu, slice_keep, budget, *, config, temperature,
                      slice_tokens, **context):
        """In paper mode (``slice_keep`` given: every slice was encoded) a dropped slice goes through DINS
        and the merge like a kept one, then keeps only its first token, as the published code does."""
        keep, merged = dins_merge(
            scores, keys, features, slice_cu, tau=float(config.tau), temperature=temperature, merge=config.merge,
            context_frac=float(config.context_frac), backend=config.backend, max_seqlen=max(slice_tokens),
            min_keep=config.min_keep, counts=None if budget is None else budget[1],
            num_targets=None if budget is None else budget[2],
        )
        merged = merged.to(features.dtype)
        if config.mode == "paper":
            # The published code keeps (IAF mask) & (DINS + merge mask): of a dropped slice, token 0 when
            # that slice's own selection has it. With the merge it always does (the targets start at
            # the first token outside the nucleus), so token 0 reaches the LLM as the official code
            # sends it: raw when in the nucleus, target + mean of its members otherwise. A budget gives
            # a dropped slice all its tokens and no target (it stays outside the budget): raw token 0.
            token_index = torch.arange(keep.numel(), device=keep.device)
            of_kept_slice = slice_keep[torch.searchsorted(slice_cu[1:].long(), token_index, right=True)]
            first_token = torch.zeros_like(keep)
            first_token[slice_cu[:-1].long()] = True
            keep = torch.where(of_kept_slice, keep, first_token)
        return keep, merged
