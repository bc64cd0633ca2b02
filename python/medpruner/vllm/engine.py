"""The ``LLM(...)`` keyword arguments for a checkpoint served with MedPruner, and the per-request knobs.

Engine-wide settings travel in the Hugging Face config (``hf_overrides["medpruner"]``), where both the
multimodal processor (front end) and the model (worker) read them; the slice-stage knobs (``gamma``,
``budget``, ``iaf``, ``gamma_local``, ``allocation``) may be overridden per request through
``mm_processor_kwargs``, which vLLM folds into each image's cache key.
"""

from __future__ import annotations

import json
import os
from typing import Any

from medpruner.config import MedPrunerConfig, canonical_family

# family -> the architecture name the plugin registers
ARCHITECTURES = {
    "qwen3_vl": "MedPrunerQwen3VLForConditionalGeneration",
    "qwen2_5_vl": "MedPrunerQwen2_5_VLForConditionalGeneration",
}
# the upstream architecture each one extends
UPSTREAM = {
    "Qwen3VLForConditionalGeneration": "qwen3_vl",
    "Qwen2_5_VLForConditionalGeneration": "qwen2_5_vl",
}
REQUEST_KNOBS = ("gamma", "budget", "iaf", "gamma_local", "allocation")
# fields a served engine does not use: the stats live in the HF path only
_NOT_SERVED = ("record_tokens",)


def serving_config(values: dict[str, Any] | None = None) -> MedPrunerConfig:
    """The MedPrunerConfig of ``values`` (a dict from ``hf_overrides["medpruner"]``), checked for
    serving: fast mode only (a dropped slice is never encoded, so the placeholders are known first)."""
    config = MedPrunerConfig.from_dict(dict(values or {}))
    if config.mode != "fast":
        raise ValueError(f"medpruner in vLLM runs mode 'fast' only, got mode {config.mode!r}")
    return config


def request_config(engine: MedPrunerConfig, overrides: dict[str, Any]) -> MedPrunerConfig:
    """``engine`` with a request's :data:`REQUEST_KNOBS`; ValueError naming the knob when it is bad or
    when no budget is set (vLLM reserves each slice's placeholders before the vision tower runs)."""
    values = engine.to_dict()
    for name in REQUEST_KNOBS:
        if name in overrides:
            values[name] = overrides[name]
    config = MedPrunerConfig.from_dict(values)
    if config.budget is None:
        raise ValueError(
            "medpruner in vLLM needs a fixed budget (a float in (0, 1] or an int >= 1 tokens per volume): "
            "set hf_overrides['medpruner']['budget'] or mm_processor_kwargs={'budget': ...}"
        )
    return config


def llm_kwargs(model: str | os.PathLike, *, family: str | None = None, config: MedPrunerConfig | None = None,
               **knobs) -> dict[str, Any]:
    """``LLM(**llm_kwargs(path, budget=0.25, gamma=0.05))`` serves ``path`` with MedPruner.

    family: "qwen3_vl" or "qwen2_5_vl"; None reads it from the checkpoint's ``config.json``. The knobs
    are :class:`MedPrunerConfig` fields (or pass ``config=``); a budget is required. Add the usual
    ``LLM`` arguments (``max_model_len``, ``limit_mm_per_prompt``, ...) to the returned dict.
    """
    if config is None:
        config = MedPrunerConfig(**knobs)
    elif knobs:
        raise TypeError("pass either config= or MedPrunerConfig keyword arguments, not both")
    settings = {k: v for k, v in config.to_dict().items() if k not in _NOT_SERVED}
    request_config(serving_config(settings), {})
    family = canonical_family(family) if family is not None else _family_of(model)
    if family not in ARCHITECTURES:
        raise ValueError(f"medpruner's vLLM plugin serves {sorted(ARCHITECTURES)}, got family {family!r}")
    return {
        "model": os.fspath(model),
        "hf_overrides": {"architectures": [ARCHITECTURES[family]], "medpruner": settings},
    }


def request_kwargs(*, gamma: float | None = None, budget: float | int | None = None, iaf: str | None = None,
                   gamma_local: float | None = None, allocation: str | None = None) -> dict[str, Any]:
    """The ``mm_processor_kwargs`` of one request's prompt dict (only the knobs given)."""
    values = {"gamma": gamma, "budget": budget, "iaf": iaf, "gamma_local": gamma_local, "allocation": allocation}
    return {"mm_processor_kwargs": {k: v for k, v in values.items() if v is not None}}


def _family_of(model) -> str:
    path = os.path.join(os.fspath(model), "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"cannot read the family of {os.fspath(model)!r} (no config.json); pass family=")
    with open(path, encoding="utf-8") as handle:
        architectures = json.load(handle).get("architectures") or []
    for name in architectures:
        if name in UPSTREAM:
            return UPSTREAM[name]
    raise ValueError(f"{os.fspath(model)!r} is {architectures}; medpruner serves {sorted(UPSTREAM)}")
