"""MedPruner's slice-stage variants beyond the paper (``MedPrunerConfig.iaf`` / ``allocation``), at a fixed
budget, for the eval to compare against every method:

* ``medpruner_local``: local-change IAF (a slice is kept when any block, one LLM token's pixels, changed
  by more than ``gamma_local``), the budget split evenly, DINS mass order and the merge;
* ``medpruner_change``: the paper's IAF, the budget split by each kept slice's change to its anchor;
* ``medpruner_local_change``: both;
* ``medpruner_attention``: the paper's IAF, the budget split by each kept slice's attention: its DINS
  nucleus size at ``tau`` (the tokens that hold ``tau`` of its attention mass), known only after the
  encoder, so HF (and the eval) only: a serving engine reserves placeholders before it.

Each slice stage returns the kept mask and each slice's change; the token stage takes the kept slices'
changes as ``slice_change``.
"""

from __future__ import annotations

from medpruner.config import budget_split, change_split, proportional_split
from medpruner.selectors.base import register
from medpruner.selectors.medpruner import CONTEXT_FRAC, GAMMA, TAU, _check_budget, budgeted_dins_merge, iaf_stage
from medpruner_kernels import iaf_local_select, nucleus_select

GAMMA_LOCAL = 0.1


def _local(method, slice_pixels, gamma_local, iaf_block, backend):
    if slice_pixels is None:
        raise ValueError(f"{method}: slice_pixels is required for the IAF slice stage")
    if iaf_block is None:
        raise ValueError(f"{method}: iaf_block (pixel values of one LLM token) is required for local IAF")
    return iaf_local_select(slice_pixels, gamma_local, block=iaf_block, return_distances=True, backend=backend)


def slices_local(
    slice_pixels, slice_cu, budget, *, generator=None, gamma_local=GAMMA_LOCAL, iaf_block=None, backend="auto"
):
    _check_budget("medpruner_local", budget)
    return _local("medpruner_local", slice_pixels, gamma_local, iaf_block, backend)


@register(
    "medpruner_local",
    budgeted=True,
    slice_stage=True,
    token_stage=True,
    slices=slices_local,
    description="local-change IAF (any merged patch's change) + the budget split evenly, DINS + merge",
)
def tokens_local(
    scores,
    keys,
    features,
    slice_cu,
    budget,
    *,
    generator=None,
    temperature=None,
    merge=True,
    context_frac=CONTEXT_FRAC,
    backend="auto",
):
    return budgeted_dins_merge(
        "medpruner_local",
        scores,
        keys,
        features,
        slice_cu,
        budget,
        budget_split,
        temperature=temperature,
        merge=merge,
        context_frac=context_frac,
        backend=backend,
    )


def slices_change(slice_pixels, slice_cu, budget, *, generator=None, gamma=GAMMA, backend="auto"):
    _check_budget("medpruner_change", budget)
    return iaf_stage("medpruner_change", slice_pixels, gamma, backend, return_distances=True)


def _by_change(slice_change):
    def shares(budget, k, n):
        if slice_change is None or slice_change.numel() != k:
            raise ValueError(f"the change split needs one slice_change per kept slice ({k})")
        return change_split(budget, slice_change.tolist(), n)

    return shares


@register(
    "medpruner_change",
    budgeted=True,
    slice_stage=True,
    token_stage=True,
    slices=slices_change,
    description="IAF + the budget split by each kept slice's change to its anchor, DINS + merge",
)
def tokens_change(
    scores,
    keys,
    features,
    slice_cu,
    budget,
    *,
    generator=None,
    slice_change=None,
    temperature=None,
    merge=True,
    context_frac=CONTEXT_FRAC,
    backend="auto",
):
    return budgeted_dins_merge(
        "medpruner_change",
        scores,
        keys,
        features,
        slice_cu,
        budget,
        _by_change(slice_change),
        temperature=temperature,
        merge=merge,
        context_frac=context_frac,
        backend=backend,
    )


def slices_local_change(
    slice_pixels, slice_cu, budget, *, generator=None, gamma_local=GAMMA_LOCAL, iaf_block=None, backend="auto"
):
    _check_budget("medpruner_local_change", budget)
    return _local("medpruner_local_change", slice_pixels, gamma_local, iaf_block, backend)


@register(
    "medpruner_local_change",
    budgeted=True,
    slice_stage=True,
    token_stage=True,
    slices=slices_local_change,
    description="local-change IAF + the budget split by each kept slice's change, DINS + merge",
)
def tokens_local_change(
    scores,
    keys,
    features,
    slice_cu,
    budget,
    *,
    generator=None,
    slice_change=None,
    temperature=None,
    merge=True,
    context_frac=CONTEXT_FRAC,
    backend="auto",
):
    return budgeted_dins_merge(
        "medpruner_local_change",
        scores,
        keys,
        features,
        slice_cu,
        budget,
        _by_change(slice_change),
        temperature=temperature,
        merge=merge,
        context_frac=context_frac,
        backend=backend,
    )


def slices_attention(slice_pixels, slice_cu, budget, *, generator=None, gamma=GAMMA, backend="auto"):
    _check_budget("medpruner_attention", budget)
    return iaf_stage("medpruner_attention", slice_pixels, gamma, backend)


@register("medpruner_attention", budgeted=True, slice_stage=True, token_stage=True, slices=slices_attention,
          description="IAF + the budget split by each kept slice's DINS nucleus size at tau, DINS + merge")
def tokens_attention(scores, keys, features, slice_cu, budget, *, generator=None, tau=TAU, temperature=None,
                     merge=True, context_frac=CONTEXT_FRAC, backend="auto"):
    def shares(budget, k, n):
        nucleus = nucleus_select(scores.view(k, n), tau, temperature=temperature, backend=backend)
        return proportional_split(budget, nucleus.sum(dim=1).tolist(), n)

    return budgeted_dins_merge("medpruner_attention", scores, keys, features, slice_cu, budget, shares,
                            temperature=temperature, merge=merge, context_frac=context_frac, backend=backend)
