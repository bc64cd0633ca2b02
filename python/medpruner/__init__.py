"""medpruner: drop-in MedPruner visual-token pruning for Hugging Face 3D medical VLMs.

Importing this package is cheap: transformers (and the adapters) load only when one of the public names
below is first used, through the module ``__getattr__``.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "apply_medpruner": "medpruner.pipeline",
    "remove_medpruner": "medpruner.pipeline",
    "prune_inputs": "medpruner.pipeline",
    "MedPrunerConfig": "medpruner.config",
    "PruneStats": "medpruner.config",
    "FAMILIES": "medpruner.config",
    "volume_to_inputs": "medpruner.pipeline",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'medpruner' has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
