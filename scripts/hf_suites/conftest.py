"""Hugging Face's own model tests with every model instance patched (issue 29 item 7).

Placed outside ``tests/`` so the default test command never collects it. Copy transformers' tests for
the installed version under this folder first (see README.md), then::

    MEDPRUNER_HF_SUITE=off      python -m pytest scripts/hf_suites/tests/models/qwen3_vl -p no:cacheprovider
    MEDPRUNER_HF_SUITE=identity python -m pytest scripts/hf_suites/tests/models/qwen3_vl -p no:cacheprovider

``off`` runs the modules unpatched (the baseline), ``identity`` patches every instance with pruning off
(gamma below every distance, tau = 1, merge off), ``pruning`` with pruning on (merge off: training tests
need a backward).
"""

from __future__ import annotations

import functools
import os

SETTINGS = {
    "identity": dict(gamma=-1.0, tau=1.0, merge=False),
    "pruning": dict(gamma=0.05, tau=0.6, merge=False),
}
MODE = os.environ.get("MEDPRUNER_HF_SUITE", "identity")
PATCHED_CLASSES = (
    "Qwen3VLForConditionalGeneration",
    "Qwen2_5_VLForConditionalGeneration",
    "Gemma3ForConditionalGeneration",
)


def patch_every_instance(cls, settings: dict) -> None:
    """Wrap ``cls.__init__`` so that each instance (of ``cls`` itself) leaves it patched."""
    from medpruner import apply_medpruner

    original = cls.__init__

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if type(self) is cls:
            apply_medpruner(self, backend="torch", **settings)

    cls.__init__ = __init__


def pytest_configure(config):
    if MODE not in (*SETTINGS, "off"):
        raise ValueError(f"MEDPRUNER_HF_SUITE must be off, identity or pruning, got {MODE!r}")
    if MODE == "off":
        return
    import transformers

    for name in PATCHED_CLASSES:
        patch_every_instance(getattr(transformers, name), SETTINGS[MODE])


def pytest_report_header(config):
    return f"medpruner HF suite: {MODE} ({', '.join(PATCHED_CLASSES) if MODE != 'off' else 'unpatched'})"
