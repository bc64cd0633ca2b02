"""Selection policies: MedPruner and the baselines, one file each, two stages (see
:mod:`medpruner.selectors.base` for a method's stages, :mod:`medpruner.selectors.policy` for what the
pipeline calls). Importing the package registers every method in ``SELECTORS``."""

from __future__ import annotations

from medpruner.selectors import (  # noqa: F401  (each module registers its method)
    dins_only,
    divprune,
    evs,
    hiprune,
    iaf_only,
    medpruner,
    medpruner_variants,
    none,
    random_tokens,
    topk_attention,
    uniform_slices,
    visionzip,
)
from medpruner.selectors.base import SELECTORS, SelectorSpec, SelectResult, get_selector, stage_counts
from medpruner.selectors.medpruner import MedPrunerPolicy
from medpruner.selectors.policy import Policy, SelectorPolicy

__all__ = [
    "SELECTORS",
    "MedPrunerPolicy",
    "Policy",
    "SelectResult",
    "SelectorPolicy",
    "SelectorSpec",
    "get_selector",
    "stage_counts",
]
