"""DINS only: the token stage of MedPruner (nucleus + contextual merge) on every slice, no IAF."""

from __future__ import annotations

from medpruner.selectors.base import all_kept, check_inputs, finish, register
from medpruner.selectors.medpruner import CONTEXT_FRAC, TAU, dins_stage


@register("dins", budgeted=False, slice_stage=False, token_stage=True,
          description="DINS nucleus + contextual merge on every slice (no IAF)")
def select_dins(scores, keys, features, slice_cu, budget=None, *, slice_pixels=None, generator=None,
                tau=TAU, temperature=None, merge=True, context_frac=CONTEXT_FRAC, backend="auto"):
    check_inputs("dins", scores, keys, features, slice_cu, slice_pixels)
    slice_keep = all_kept(scores, slice_cu)
    token_keep, out = dins_stage(scores, keys, features, slice_cu, slice_keep, tau=tau, temperature=temperature,
                                 merge=merge, context_frac=context_frac, backend=backend)
    return finish(slice_keep, token_keep, out, slice_cu)
