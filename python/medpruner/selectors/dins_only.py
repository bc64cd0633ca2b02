"""DINS only: the token stage of MedPruner (nucleus + contextual merge) on every slice, no IAF."""

from __future__ import annotations

from medpruner.selectors.base import register
from medpruner.selectors.medpruner import CONTEXT_FRAC, TAU, tokens_medpruner


@register("dins", budgeted=False, slice_stage=False, token_stage=True,
          description="DINS nucleus + contextual merge on every slice (no IAF)")
def tokens_dins(scores, keys, features, slice_cu, budget=None, *, generator=None,
                tau=TAU, temperature=None, merge=True, context_frac=CONTEXT_FRAC, backend="auto"):
    return tokens_medpruner(scores, keys, features, slice_cu, budget, tau=tau, temperature=temperature, merge=merge,
                            context_frac=context_frac, backend=backend)
