"""The ``apply_medpruner`` / ``remove_medpruner`` entry points and the "volume + prompt -> processor
inputs" helper. The configuration and stats live in :mod:`medpruner.config` (re-exported here).

``apply_medpruner(model, ...)`` patches a loaded Hugging Face VLM in place (the Liger-Kernel habit):
its ``forward`` and ``generate`` then prune the visual tokens of every request that carries images, and
``model.medpruner_stats`` describes the last pruned request. Each sequence of a batch is one volume: all
its images are that volume's slices, in acquisition order.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from medpruner.adapters import adapter_for, unpatch
from medpruner.config import (
    FAMILIES,
    FAMILY_ALIASES,
    MODES,
    MedPrunerConfig,
    PruneStats,
    canonical_family,
)

__all__ = [
    "FAMILIES",
    "FAMILY_ALIASES",
    "MODES",
    "MedPrunerConfig",
    "PruneStats",
    "apply_medpruner",
    "ct_windows_to_rgb",
    "prune_inputs",
    "remove_medpruner",
    "volume_to_inputs",
]

logger = logging.getLogger("medpruner")


def apply_medpruner(
    model,
    *,
    gamma: float = 0.05,
    tau: float = 0.9,
    merge: bool = True,
    mode: str = "fast",
    temperature: float | None = None,
    importance_layer: int = -1,
    context_frac: float = 0.05,
    min_keep: int = 1,
    backend: str = "auto",
    record_tokens: bool = False,
    budget: float | int | None = None,
    iaf: str = "mean",
    gamma_local: float = 0.1,
    iaf_block: int | None = None,
    allocation: str = "even",
    config: MedPrunerConfig | None = None,
):
    """Patch a loaded Hugging Face VLM in place so that its ``forward`` and ``generate`` prune visual
    tokens with MedPruner, and return it.

    The knobs are those of :class:`MedPrunerConfig` (pass ``config=`` to reuse one; the keyword values
    are then ignored). Calling it again on a patched model replaces the configuration. A model class no
    adapter handles raises TypeError naming the class; a bad value raises ValueError naming the field.

    The patched model keeps the Hugging Face contracts of the unpatched one:

    * ``generate`` prunes once, before decoding, without gradients (as generate itself runs), and hands
      the original generate the kept features with one encoder-output entry per image, so beam search,
      ``num_return_sequences`` and assisted decoding repeat each request's own features. The returned
      sequences start with the caller's unpruned prompt (slice at ``input_ids.shape[1]`` for the new
      tokens).
    * The cache a pruned request filled remembers its pruned prompt: ``generate`` continued from it
      with the caller's ``input_ids`` (prompt + new tokens, no pixels) decodes as one longer call would.
    * Training: the selection (IAF, DINS, merge targets) takes no gradient and the kept tokens' features
      stay differentiable, so ``merge=False`` trains (gradient checkpointing included); ``merge=True``
      has no backward and raises ValueError in training mode with gradients enabled (evaluate under
      ``torch.no_grad()``).
    * ``copy.deepcopy`` and pickling give a patched copy that runs its own weights; ``save_pretrained``
      writes the weights only (patch the reloaded model again).
    * Qwen's ``image_outputs`` keep the vision tower's hidden states / attentions and have one
      ``pooler_output`` entry per image (empty for a slice IAF dropped).
    * A request the model accepts but pruning cannot handle (``inputs_embeds``, videos) runs unpruned,
      with a warning.
    * The caller's layout is kept: a right-padded batch stays right-padded (``logits[r, t]`` lines up
      with the caller's ids minus the pruned tokens), each row is pruned as it would be alone, labels
      gain no loss term, and a caller's ``position_ids`` are pruned with the sequence and used as given.
      At identity settings (gamma below every distance, tau = 1, merge=False) the original forward
      gets the caller's own call.
    * ``torch.compile(model)`` (``fullgraph`` too) and ``generate``'s compiled static-cache decoding
      work: the pruning runs eagerly and the original ``forward`` is what gets compiled.
    * A wrong number of images for the placeholders raises ValueError naming the mismatch.
    * Kernel value checks deferred while pruning (on CUDA, where reading them back would sync) are
      raised by the request that queued them, at its last host read or once the original ``forward``
      / ``generate`` returns.
    """
    if config is None:
        config = MedPrunerConfig(
            gamma=gamma,
            tau=tau,
            merge=merge,
            mode=mode,
            temperature=temperature,
            importance_layer=importance_layer,
            context_frac=context_frac,
            min_keep=min_keep,
            backend=backend,
            record_tokens=record_tokens,
            budget=budget,
            iaf=iaf,
            gamma_local=gamma_local,
            iaf_block=iaf_block,
            allocation=allocation,
        )
    elif not isinstance(config, MedPrunerConfig):
        raise TypeError(f"config must be a MedPrunerConfig, got {type(config).__name__}")
    else:
        config.validate()
    adapter = adapter_for(model)
    adapter.check_config(model, config)
    adapter.patch(model, config)
    return model


def prune_inputs(model, inputs, *, config: MedPrunerConfig | None = None, return_stats: bool = False, **knobs):
    """The core of the package: a processor's outputs in, pruned inputs out that the *unpatched*
    model's own ``forward`` and ``generate`` accept, giving the tokens ``apply_medpruner(model, **knobs)``
    gives on ``inputs`` (greedy decoding).

    Args:
        model: a loaded Qwen3-VL, Qwen2.5-VL or Gemma3 (MedGemma) model, patched or not.
        inputs: the processor's outputs (``input_ids``, ``attention_mask``, the pixels and grids...),
            one volume per row, its slices as the row's images in acquisition order.
        config / knobs: a :class:`MedPrunerConfig`, or its fields as keywords (``gamma``, ``tau``,
            ``mode``, ``budget``, ...; the defaults are the paper's).
        return_stats: also return the request's :class:`PruneStats`.

    Returns:
        a dict: the pruned ``input_ids`` and ``attention_mask`` (rows keep the caller's padding side:
        right-padded stays right-padded), the positions (the caller's ``position_ids`` pruned with the
        sequence when given; otherwise Qwen's M-RoPE ids keep each kept token's (t, h, w)),
        ``mm_token_type_ids``, the kept visual features as precomputed encoder outputs
        (``mm_encoder_outputs``), and every other key of ``inputs`` the model still needs;
        ``(dict, PruneStats)`` with ``return_stats``. Inputs without images come back unchanged (stats
        None).

    The selection takes no gradient. Qwen models keep the M-RoPE delta of their last request on the
    model (``model.model.rope_deltas``, transformers' own state, which its ``generate`` reads while
    decoding): prepare a request right before generating it. A request pruning cannot apply to
    (``inputs_embeds``, videos) is a ValueError naming the reason; kernel checks deferred on CUDA are
    raised here."""
    from medpruner.adapters.patching import TOWER_OUTPUT_FLAGS
    from medpruner_kernels._validation import error_scope, raise_pending_errors

    if config is None:
        config = MedPrunerConfig(**knobs)
    elif knobs:
        raise TypeError(f"prune_inputs: pass either config or knobs, not both (got {sorted(knobs)})")
    elif not isinstance(config, MedPrunerConfig):
        raise TypeError(f"config must be a MedPrunerConfig, got {type(config).__name__}")
    else:
        config.validate()
    adapter = adapter_for(model)
    adapter.check_config(model, config)
    call = dict(inputs)
    if not adapter.wants_pruning(call):
        return (call, None) if return_stats else call
    reason = adapter.unprunable(call)
    if reason is not None:
        raise ValueError(f"prune_inputs: this request cannot be pruned: {reason}")
    start = time.perf_counter()
    with torch.no_grad(), error_scope():
        pruned = adapter.prune(model, config, {k: v for k, v in call.items() if k not in TOWER_OUTPUT_FLAGS})
        raise_pending_errors()
    pruned.stats.prune_seconds = time.perf_counter() - start
    return (pruned.call, pruned.stats) if return_stats else pruned.call


def remove_medpruner(model):
    """Undo :func:`apply_medpruner` (a no-op on a model that is not patched); returns the model."""
    unpatch(model)
    return model


# ---------------------------------------------------------------------------------- volume -> inputs

# Three CT windows (center, width) in Hounsfield units, one per RGB channel, in the spirit of MedGemma's
# CT recipe: the full range, soft tissue, lung. Pass your own to ``ct_windows_to_rgb`` to match a checkpoint.
CT_RGB_WINDOWS = ((0.0, 2048.0), (40.0, 400.0), (-600.0, 1500.0))


def ct_windows_to_rgb(volume_hu, windows=CT_RGB_WINDOWS) -> torch.Tensor:
    """``[D, H, W]`` Hounsfield units -> ``[D, H, W, 3]`` in [0, 1], one CT window per channel."""
    hu = torch.as_tensor(volume_hu, dtype=torch.float32)
    if hu.ndim != 3:
        raise ValueError(f"volume_hu must be [D, H, W], got shape {tuple(hu.shape)}")
    channels = []
    for center, width in windows:
        low = center - width / 2.0
        channels.append(((hu - low) / width).clamp(0.0, 1.0))
    return torch.stack(channels, dim=-1)


def volume_to_inputs(
    processor,
    volume,
    prompt: str,
    *,
    family: str,
    resolution: int | tuple[int, int] | None = None,
    ct_windows: bool = False,
    return_tensors: str = "pt",
):
    """Build processor inputs that feed a volume the paper's way: one image per slice.

    Args:
        processor: the model's Hugging Face processor.
        volume: ``[D, H, W]`` tensor/array with values in [0, 1] (grey slices, replicated to RGB), or
            ``[D, H, W, 3]`` RGB in [0, 1]; with ``ct_windows=True`` a ``[D, H, W]`` volume in Hounsfield
            units, turned into MedGemma's 3-window RGB (full range, soft tissue, lung).
        prompt: the question, placed after the slices.
        family: "qwen3_vl" / "qwen2_5_vl" (each slice is ``<|vision_start|><|image_pad|><|vision_end|>``)
            or "medgemma" (each slice is ``SLICE i: <start_of_image>``).
        resolution: pinned per-slice size (pixels, a square side or (H, W)): slices are resized to it so
            every slice of the volume has the same grid (IAF compares slices element-wise). None keeps
            the volume's size (Qwen) or the processor's fixed size (MedGemma).

    Returns the processor's BatchFeature (input_ids, attention_mask, pixel_values, ...).
    """
    family = canonical_family(family)
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    slices = _volume_to_rgb(volume, ct_windows)
    if resolution is not None:
        size = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
        if len(size) != 2 or min(size) <= 0:
            raise ValueError(f"resolution must be a positive int or (H, W), got {resolution!r}")
        slices = torch.nn.functional.interpolate(
            slices.permute(0, 3, 1, 2), size=size, mode="bilinear", align_corners=False, antialias=True
        ).permute(0, 2, 3, 1)
        slices = slices.clamp(0.0, 1.0)
    images = [s.numpy() for s in slices]
    images_kwargs: dict[str, Any] = {"do_rescale": False}
    if family in ("qwen3_vl", "qwen2_5_vl"):
        height, width = images[0].shape[:2]
        image_processor = processor.image_processor
        factor = image_processor.patch_size * image_processor.merge_size
        pixels = max(factor, round(height / factor) * factor) * max(factor, round(width / factor) * factor)
        # A pixel budget of exactly the slice's own (factor-rounded) area makes the processor's smart
        # resize a no-op beyond the rounding, so every slice gets the same grid on every call (IAF needs
        # one grid per volume); choose ``resolution`` to set the token count per slice.
        images_kwargs["size"] = {"shortest_edge": pixels, "longest_edge": pixels}
        image_text = "<|vision_start|><|image_pad|><|vision_end|>" * len(images)
        text = _chat(processor, image_text, prompt)
    else:
        image_text = "".join(f"SLICE {i + 1}: {processor.boi_token}" for i in range(len(images)))
        text = _chat(processor, image_text, prompt)
    return processor(text=[text], images=[images], return_tensors=return_tensors, images_kwargs=images_kwargs)


def _volume_to_rgb(volume, ct_windows: bool) -> torch.Tensor:
    if ct_windows:
        return ct_windows_to_rgb(volume)
    data = torch.as_tensor(volume, dtype=torch.float32)
    if data.ndim == 3:
        data = data.unsqueeze(-1).expand(-1, -1, -1, 3)
    if data.ndim != 4 or data.shape[-1] != 3 or data.shape[0] == 0:
        raise ValueError(
            f"volume must be [D, H, W] or [D, H, W, 3] with D >= 1, got shape {tuple(data.shape)}"
        )
    if not torch.isfinite(data).all() or data.min() < 0 or data.max() > 1:
        raise ValueError(
            "volume values must be finite and in [0, 1] (window CT first, or pass ct_windows=True)"
        )
    return data.contiguous()


def _chat(processor, image_text: str, prompt: str) -> str:
    """The user turn through the processor's chat template when it has one, else the raw text."""
    template = getattr(processor, "chat_template", None) or getattr(
        processor.tokenizer, "chat_template", None
    )
    if not template:
        return image_text + prompt
    messages = [{"role": "user", "content": [{"type": "text", "text": image_text + prompt}]}]
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
