"""IAF only: the slice stage of MedPruner; every token of a kept slice stays."""

from __future__ import annotations

from medpruner.selectors.base import all_tokens, register
from medpruner.selectors.medpruner import GAMMA, iaf_stage


def slices_iaf(slice_pixels, slice_cu, budget=None, *, generator=None, gamma=GAMMA, backend="auto"):
    return iaf_stage("iaf", slice_pixels, gamma, backend)


@register("iaf", budgeted=False, slice_stage=True, token_stage=False, slices=slices_iaf,
          description="IAF slice filtering only (all tokens of the kept slices)")
def tokens_iaf(scores, keys, features, slice_cu, budget=None, *, generator=None):
    return all_tokens(scores), features
