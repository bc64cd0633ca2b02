"""Model-family adapters: the registry, the base interface, and the sequence surgery they share.

An adapter turns one request with images (the keyword arguments of the model's ``forward`` or
``generate``) into the same request with fewer visual tokens: it runs the vision tower once (on the slices
IAF keeps in fast mode), scores the tokens, selects and merges them with the medpruner_kernels ops, and
rebuilds ``input_ids``, ``attention_mask``, the token-type ids and the position ids around the kept
tokens. The patched ``forward``/``generate`` then call the model's original methods with the pruned
request and the precomputed features (``mm_encoder_outputs``), so the language model, its KV cache and
``generate`` see a shorter, self-consistent sequence.

Adding a family (e.g. Hulu-Med) means subclassing :class:`Adapter` and registering the model class names
with :func:`register_adapter`. The subclass provides:

* ``family``, ``default_temperature`` (the paper's T: 1 for Hulu-Med) and ``pixel_key``;
* ``prune(model, config, call) -> PrunedCall``, which needs from the model:
  - where each slice's placeholder tokens sit in ``input_ids`` (an image token id, and the text tokens
    that wrap each slice, which fast mode removes together with a dropped slice);
  - the per-slice pixel tensor, on the processor's normalised scale, to run IAF on;
  - a vision-encoder layer to hook for post-RoPE q/k (``attention_importance``) and the grouping of
    encoder patches into LLM tokens (consecutive groups, or spatial blocks to pool like Gemma3);
  - the features that enter the LLM (after the projector) and any side features to filter alike;
  - the position-id policy: Qwen-style M-RoPE coordinates gathered from the unpruned sequence, or
    contiguous renumbering (Gemma3, Hulu-Med);
  - how the model's forward accepts precomputed features (``mm_encoder_outputs`` in transformers 5,
    or ``inputs_embeds`` for remote-code models that lack it);
* optionally ``check_config`` to reject knobs the model cannot honour (ValueError naming the field).

:func:`repack_sequences` and :func:`compact_indices` do the sync-free parts every adapter shares.

Hulu-Med (not shipped: its checkpoints use remote code that is not installed here, and an adapter that
cannot be tested against the real model class would be a guess) needs, concretely:

* registration under the class name its remote code defines, and ``default_temperature = 1.0``;
* the slice layout its processor emits for a volume (one image per slice, or one 3-D video-like input
  whose frames are the slices): IAF then runs per volume on those frames' normalised pixels, and the
  frame grid decides which placeholder run belongs to which slice;
* a hook on the last block of its vision encoder that yields the post-RoPE q/k when the encoder applies
  a rotary embedding inside attention (hook where the Qwen adapter hooks: the qkv projection plus the
  rotary tables the block receives; plain q/k projections as in Gemma3 otherwise), and the encoder's
  patch-to-token merge, to group the scores like the features;
* contiguous position renumbering of the pruned sequence (DESIGN.md: Gemma3/Hulu), as the Gemma3 adapter;
* if its forward has no ``mm_encoder_outputs`` argument, build ``inputs_embeds`` from the pruned
  ``input_ids`` and scatter the kept features into its placeholder rows, then call the original forward
  and ``generate`` with ``inputs_embeds`` (``generate`` then returns only the new tokens, so
  ``_restore_prompt`` must prepend the caller's prompt).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

logger = logging.getLogger("medpruner")

# model class name -> "module:AdapterClass"; resolved lazily so transformers loads only when needed.
_REGISTRY: dict[str, str] = {}
_PATCH_ATTR = "_medpruner_patch"


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


@dataclass
class PrunedCall:
    """The request to hand to the original forward/generate, and what the caller needs afterwards."""

    call: dict[str, Any]
    original_input_ids: torch.Tensor
    pruned_length: int
    stats: Any


class Adapter:
    """Base class: patching, the forward/generate wrappers, timing and stats. Subclasses implement
    :meth:`prune` (see the module docstring for what a family must provide)."""

    family = "base"
    default_temperature = 1.0
    pixel_key = "pixel_values"

    # --------------------------------------------------------------------------- family interface
    def prune(self, model, config, call: dict[str, Any]) -> PrunedCall:
        raise NotImplementedError

    def check_config(self, model, config) -> None:
        depth = self.vision_depth(model)
        if not -depth <= config.importance_layer < depth:
            raise ValueError(
                f"importance_layer must be in [-{depth}, {depth - 1}] for this vision tower of {depth} "
                f"blocks, got {config.importance_layer}"
            )

    def vision_depth(self, model) -> int:
        raise NotImplementedError

    def select_tokens(self, scores, keys, pooled, token_cu, enc_tokens, slice_keep, config):
        """DINS + merge over the encoded slices -> (final keep mask, features to gather from).

        scores/keys/pooled: per LLM token of the encoded slices (flat, ``token_cu`` offsets); slice_keep:
        the IAF mask, used in paper mode, where every slice is encoded and a dropped one keeps only its
        first token."""
        from medpruner_kernels import nucleus_select
        from medpruner_kernels.merge import merge_tokens

        temperature = config.resolved_temperature(self.default_temperature)
        keep = nucleus_select(
            scores,
            float(config.tau),
            temperature=temperature,
            cu_seqlens=token_cu,
            max_seqlen=max(enc_tokens),
            min_keep=config.min_keep,
            backend=config.backend,
        )
        total = keep.numel()
        if config.mode == "paper":
            slice_of_token = slice_keep.repeat_interleave(
                torch.tensor(enc_tokens, device=keep.device), output_size=total
            )
            first_token = torch.zeros_like(keep)
            first_token[token_cu[:-1].long()] = True
            # A dropped slice takes no part in the merge: all its tokens count as kept until the
            # final mask reduces it to its first token.
            keep = keep | ~slice_of_token
        features = pooled
        if config.merge:
            features, keep = merge_tokens(
                pooled,
                keys,
                keep,
                cu_seqlens=token_cu,
                context_frac=float(config.context_frac),
                backend=config.backend,
            )
            features = features.to(pooled.dtype)
        if config.mode == "paper":
            keep = torch.where(slice_of_token, keep, first_token)
        return keep, features

    # ------------------------------------------------------------------------------------ patching
    def wants_pruning(self, call: dict[str, Any]) -> bool:
        if call.get(self.pixel_key) is None or call.get("input_ids") is None:
            return False
        cache = call.get("past_key_values")
        return cache is None or cache.get_seq_length() == 0

    def run(self, model, config, call: dict[str, Any]) -> PrunedCall:
        start = time.perf_counter()
        pruned = self.prune(model, config, call)
        pruned.stats.prune_seconds = time.perf_counter() - start
        model.medpruner_stats = pruned.stats
        logger.debug("%s", pruned.stats.summary())
        return pruned

    def patch(self, model, config) -> None:
        unpatch(model)
        original_forward = model.forward
        original_generate = model.generate
        adapter = self
        forward_signature = inspect.signature(original_forward)

        @functools.wraps(original_forward)
        def forward(*args, **kwargs):
            call = _bind(forward_signature, args, kwargs)
            if not adapter.wants_pruning(call):
                return original_forward(*args, **kwargs)
            return original_forward(**adapter.run(model, config, call).call)

        @functools.wraps(original_generate)
        def generate(inputs=None, *args, **kwargs):
            if isinstance(inputs, torch.Tensor) and kwargs.get("input_ids") is None:
                kwargs["input_ids"], inputs = inputs, None
            if inputs is not None or not adapter.wants_pruning(kwargs):
                return original_generate(inputs, *args, **kwargs)
            pruned = adapter.run(model, config, kwargs)
            call = pruned.call
            _translate_length_budget(model, call, pruned)
            output = original_generate(*args, **call)
            return _restore_prompt(output, pruned)

        model.forward = forward
        model.generate = generate
        setattr(model, _PATCH_ATTR, (config, adapter))
        model.medpruner_config = config
        model.medpruner_stats = None


def unpatch(model) -> None:
    if getattr(model, _PATCH_ATTR, None) is None:
        return
    for name in ("forward", "generate", _PATCH_ATTR, "medpruner_config", "medpruner_stats"):
        model.__dict__.pop(name, None)


def _bind(signature: inspect.Signature, args, kwargs) -> dict[str, Any]:
    bound = signature.bind_partial(*args, **kwargs)
    call = dict(bound.arguments)
    for name, parameter in signature.parameters.items():
        if parameter.kind is inspect.Parameter.VAR_KEYWORD and name in call:
            call.update(call.pop(name))
    return call


def _translate_length_budget(model, call: dict[str, Any], pruned: PrunedCall) -> None:
    """``max_length`` counts the prompt: keep the unpruned prompt's budget of new tokens, not more."""
    if call.get("max_new_tokens") is not None:
        return
    generation_config = call.get("generation_config") or model.generation_config
    if getattr(generation_config, "max_new_tokens", None) is not None:
        return
    max_length = call.pop("max_length", None) or getattr(generation_config, "max_length", None)
    if max_length is not None:
        budget = max_length - pruned.original_input_ids.shape[1]
        if budget > 0:
            call["max_new_tokens"] = budget


def _restore_prompt(output, pruned: PrunedCall):
    """generate returns prompt + new tokens: put the caller's unpruned prompt back so that slicing the
    output at ``input_ids.shape[1]`` still yields exactly the new tokens."""
    sequences = output if isinstance(output, torch.Tensor) else output.sequences
    prompt = pruned.original_input_ids.to(sequences.device)
    if sequences.shape[0] != prompt.shape[0]:
        prompt = prompt.repeat_interleave(sequences.shape[0] // prompt.shape[0], dim=0)
    restored = torch.cat([prompt, sequences[:, pruned.pruned_length :]], dim=1)
    if isinstance(output, torch.Tensor):
        return restored
    output.sequences = restored
    return output


# ------------------------------------------------------------------------------- shared surgery
def compact_indices(mask: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the True entries of a 1-D ``mask``, given their ``count`` (already on the host), with
    no host sync: each True entry scatters its index to its rank; False entries go to a spare slot."""
    rank = torch.cumsum(mask, dim=0) - 1
    slot = torch.where(mask, rank, torch.full_like(rank, count))
    out = torch.zeros(count + 1, dtype=torch.long, device=mask.device)
    out.scatter_(0, slot, torch.arange(mask.numel(), device=mask.device))
    return out[:count]


def repack_sequences(
    keep: torch.Tensor, counts: torch.Tensor, length: int, tensors: dict[str, tuple[torch.Tensor, int]]
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Left-pad the kept positions of each row to ``length``, without host syncs.

    keep: bool ``[B, L]`` (padding of the input must already be False); counts: ``[B]`` kept per row
    (device tensor, ``length`` = its max read once by the caller); tensors: name -> (tensor whose last
    two dims are ``[B, L]``, fill value). Returns the repacked tensors and the new ``[B, length]``
    attention mask (long).
    """
    batch, seq = keep.shape
    rank = torch.cumsum(keep, dim=1) - 1
    column = (length - counts).unsqueeze(1) + rank
    row = torch.arange(batch, device=keep.device).unsqueeze(1) * (length + 1)
    slot = torch.where(keep, row + column, row + length).reshape(-1)
    out = {}
    for name, (tensor, fill) in tensors.items():
        lead = tensor.shape[:-2]
        flat = tensor.reshape(*lead, batch * seq)
        target = torch.full((*lead, batch * (length + 1)), fill, dtype=tensor.dtype, device=tensor.device)
        target.scatter_(-1, slot.expand(*lead, -1), flat)
        out[name] = target.reshape(*lead, batch, length + 1)[..., :length]
    columns = torch.arange(length, device=keep.device).unsqueeze(0)
    attention_mask = (columns >= (length - counts).unsqueeze(1)).long()
    return out, attention_mask


def recorded_tokens(scores: torch.Tensor, keep: torch.Tensor, config) -> dict[str, torch.Tensor | None]:
    """The PruneStats token fields: CPU copies of the DINS scores and final keep mask when the config
    asks for them (two device-to-host copies, after the adapter's own sync), nothing otherwise."""
    if not config.record_tokens:
        return {"token_scores": None, "token_keep": None}
    return {"token_scores": scores.detach().float().cpu(), "token_keep": keep.detach().cpu()}


def host_offsets(lengths: list[int]) -> list[int]:
    """``[0, l0, l0 + l1, ...]``: running offsets of host lengths."""
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    return offsets


def count_ranges(counts: list[int]) -> list[tuple[int, int]]:
    """``(start, end)`` of consecutive groups of the given sizes."""
    offsets = host_offsets(counts)
    return list(zip(offsets[:-1], offsets[1:]))


def range_lengths(ranges: list[tuple[int, int]]) -> list[int]:
    return [end - start for start, end in ranges]


def range_index(ranges: list[tuple[int, int]], device) -> torch.Tensor:
    """Concatenated aranges of host ranges, built on the host and copied (no sync)."""
    parts = [torch.arange(start, end) for start, end in ranges]
    flat = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
    return flat.to(device, non_blocking=True)


def segment_offsets(lengths: list[int], device) -> torch.Tensor:
    """int32 ``[n+1]`` offsets from host lengths (an H2D copy, no sync)."""
    return torch.tensor(host_offsets(lengths), dtype=torch.int32).to(device, non_blocking=True)


def pad_token_id(cfg) -> int:
    """The model's pad token id (top-level or text config), 0 when it has none."""
    for source in (cfg, getattr(cfg, "text_config", None)):
        value = getattr(source, "pad_token_id", None) if source is not None else None
        if value is not None:
            return int(value)
    return 0


def image_runs(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, image_token_id: int):
    """(valid, is_image, run_start) ``[B, L]`` bool masks: the non-padding positions, the image
    placeholders among them, and the first placeholder of each image's run."""
    valid = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
    is_image = (input_ids == image_token_id) & valid
    run_start = is_image & ~F.pad(is_image[:, :-1], (1, 0), value=False)
    return valid, is_image, run_start
