"""Model-family adapters: the registry. The pipeline lives in ``base.py``; each family file holds only
its hooks.

An adapter turns one request with images (the keyword arguments of the model's ``forward`` or
``generate``) into the same request with fewer visual tokens and hands it, with the kept encoder
features (``mm_encoder_outputs``), to the model's original methods, so the language model, its KV cache
and ``generate`` see a shorter, self-consistent sequence.

Adding a family (e.g. Hulu-Med) is a small file: subclass :class:`~medpruner.adapters.base.Adapter`
(or :class:`~medpruner.adapters.qwen.QwenVLAdapter` for a Qwen-based tower), set ``family`` (a name in
``medpruner.config.FAMILIES``) and ``default_temperature`` (the paper's T: 1 for Hulu-Med), fill in the
hooks ``base.py`` lists (layout, IAF rows, encode with the importance capture, positions, packaging),
and register the model class names with :func:`register_adapter`. For Hulu-Med concretely (not shipped:
its checkpoints use remote code that is not installed here, and an adapter that cannot be tested against
the real model class would be a guess): the slice layout its processor emits (one image per slice, or
one 3-D input whose frames are the slices), a hook on the last encoder block for post-RoPE q/k and its
patch-to-token merge, contiguous renumbering (the base default), and, if its forward has no
``mm_encoder_outputs`` argument, a ``package`` that builds ``inputs_embeds`` instead.
"""

from __future__ import annotations

import importlib

from medpruner.adapters.base import Adapter, PrunedCall, unpatch
from medpruner.adapters.sequences import host_read

__all__ = [
    "Adapter",
    "PrunedCall",
    "adapter_for",
    "host_read",
    "register_adapter",
    "supported_model_classes",
    "unpatch",
]

# model class name -> "module:AdapterClass"; resolved lazily so transformers loads only when needed.
_REGISTRY: dict[str, str] = {}


def register_adapter(model_class_names, adapter: str | type) -> None:
    """Route models whose class (or a base class) has one of these names to ``adapter``: an Adapter
    subclass, or a ``"module:ClassName"`` string imported on first use."""
    target = adapter if isinstance(adapter, str) else f"{adapter.__module__}:{adapter.__qualname__}"
    for name in model_class_names:
        _REGISTRY[name] = target


register_adapter(["Qwen3VLForConditionalGeneration"], "medpruner.adapters.qwen3_vl:Qwen3VLAdapter")
register_adapter(["Qwen2_5_VLForConditionalGeneration"], "medpruner.adapters.qwen2_5_vl:Qwen25VLAdapter")
register_adapter(["Gemma3ForConditionalGeneration"], "medpruner.adapters.gemma3:Gemma3Adapter")


def supported_model_classes() -> list[str]:
    return sorted(_REGISTRY)


def adapter_for(model) -> Adapter:
    """The adapter for ``model``; TypeError naming the class when no family matches."""
    for klass in type(model).__mro__:
        target = _REGISTRY.get(klass.__name__)
        if target is not None:
            module_name, class_name = target.split(":")
            return getattr(importlib.import_module(module_name), class_name)()
    raise TypeError(
        f"medpruner has no adapter for model class {type(model).__name__}; supported classes: "
        f"{', '.join(supported_model_classes())}"
    )
