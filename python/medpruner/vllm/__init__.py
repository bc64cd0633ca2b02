"""MedPruner inside vLLM: model classes for Qwen3-VL and Qwen2.5-VL that prune each request's volume
to a fixed visual-token budget (DESIGN.md "vLLM plugin", "Fixed token budget").

The entry point ``register`` (group ``vllm.general_plugins``) adds two architectures to vLLM's model
registry; a user selects one with ``hf_overrides={"architectures": [name], "medpruner": {...}}``
(:func:`medpruner.vllm.engine.llm_kwargs` builds these). One request is one volume: its images are
the slices, in order, each written as ``<|vision_start|><|image_pad|><|vision_end|>`` one after the
other. Per request, ``mm_processor_kwargs={"gamma": ..., "budget": ...}`` override the engine's values.
"""

from __future__ import annotations

from medpruner.vllm.engine import ARCHITECTURES, REQUEST_KNOBS, llm_kwargs, request_kwargs

__all__ = ["ARCHITECTURES", "REQUEST_KNOBS", "llm_kwargs", "register", "request_kwargs"]


def register() -> None:
    """vLLM general plugin: check this vLLM (:func:`medpruner.vllm._compat.check`: one error naming every
    internal name the plugin uses that is missing, and the tested range), register the MedPruner
    architectures (lazily, by module path) and their start-up check of the features combined with them
    (:mod:`medpruner.vllm.features`). Safe to call more than once; vLLM calls it in every process it
    starts."""
    from vllm import ModelRegistry

    from medpruner.vllm import _compat
    from medpruner.vllm.features import config_hook

    _compat.check()
    hooks = _compat.MODELS_CONFIG_MAP
    # each architecture name is its model class's name in medpruner.vllm.models
    for name in ARCHITECTURES.values():
        if name not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(name, f"medpruner.vllm.models:{name}")
        hooks[name] = config_hook()
