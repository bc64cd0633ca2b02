"""Token/slice selection methods of the eval: MedPruner and the baselines, one file each, one signature
(see :mod:`medpruner.selectors.base`). Importing the package registers every method in ``SELECTORS``."""

from __future__ import annotations

from medpruner.selectors import (  # noqa: F401  (each module registers its method)
    dins_only,
    divprune,
    evs,
    hiprune,
    iaf_only,
    medpruner,
    none,
    random_tokens,
    topk_attention,
    uniform_slices,
    visionzip,
)
from medpruner.selectors.base import SELECTORS, SelectorSpec, SelectResult, get_selector, stage_counts

__all__ = ["SELECTORS", "SelectResult", "SelectorSpec", "get_selector", "stage_counts"]
