"""IAF only: the slice stage of MedPruner; every token of a kept slice stays."""

from __future__ import annotations

from medpruner.selectors.base import check_inputs, finish, register, slice_of_token
from medpruner.selectors.medpruner import GAMMA, iaf_stage


@register("iaf", budgeted=False, slice_stage=True, token_stage=False,
          description="IAF slice filtering only (all tokens of the kept slices)")
def select_iaf(scores, keys, features, slice_cu, budget=None, *, slice_pixels=None, generator=None,
               gamma=GAMMA, backend="auto"):
    check_inputs("iaf", scores, keys, features, slice_cu, slice_pixels)
    slice_keep = iaf_stage("iaf", slice_pixels, gamma, backend)
    return finish(slice_keep, slice_keep[slice_of_token(slice_cu)], features, slice_cu)
