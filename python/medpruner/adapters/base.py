"""The one pruning pipeline every model family shares (:meth:`Adapter.prune`); the sync-free tensor
surgery it needs is in :mod:`medpruner.adapters.sequences`. The patching of a model instance's
``forward`` and ``generate`` that calls it (the wrappers, the continuation bookkeeping on the cache,
:func:`unpatch`) lives in :mod:`medpruner.adapters.patching`; :meth:`Adapter.patch` installs it.

A family file subclasses :class:`Adapter` and fills in a small fixed set of hooks:

* :meth:`Adapter.layout`: where the slices sit: tokens and pixel rows per image (host metadata the
  model's own vision tower reads anyway; nothing that waits on our device work);
* :meth:`Adapter.iaf_slices`: each slice's pixels as rows for IAF, on the paper's [-1, 1] scale;
* :meth:`Adapter.encode`: run the vision tower on the chosen images, capturing the token importance
  and merge keys from block ``importance_layer``;
* :meth:`Adapter.position_inputs` / :meth:`Adapter.finish_positions`: the position policy (Qwen
  M-RoPE keeps each token's original (t, h, w); Gemma renumbers);
* :meth:`Adapter.package`: how the kept encoder features are handed to the original forward;
* :attr:`Adapter.wrapper_ids` / :attr:`Adapter.type_ids_key`: the tokens around each image and the
  per-token type tensor repacked with the sequence.

Host reads. Every value read back from the device goes through :func:`host_read`, after all device
work it depends on is queued, and only where a host-side shape needs it: paper mode reads once (after
DINS); fast mode with a budget reads once (the IAF mask decides what the tower encodes and, with the
budget, every count); adaptive fast mode reads twice (the IAF mask before the tower, the DINS counts
after it). Deferred kernel checks queued before the last read are raised there; those queued after it
(the DINS and merge kernels, in fast mode with a budget) are raised once the original forward/generate
returns. Host-to-device copies come from pinned memory with ``non_blocking`` (:func:`to_device`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from medpruner.adapters.patching import _PATCH_ATTR, _PATCHED_NAMES, PatchedMethod, PromptRecord, _cache_of, unpatch

# re-exported: the family files read the tower output flags from here
from medpruner.adapters.patching import TOWER_OUTPUT_FLAGS as TOWER_OUTPUT_FLAGS
from medpruner.adapters.sequences import (
    caller_positions,
    compact_indices,
    count_ranges,
    host_offsets,
    host_read,
    image_runs,
    pad_token_id,
    padded_right,
    per_image_outputs,
    range_index,
    recorded_tokens,
    repack_sequences,
    row_span,
    to_device,
)
from medpruner.config import PruneStats, budget_counts, change_counts
from medpruner.selectors.medpruner import MedPrunerPolicy
from medpruner.selectors.policy import Policy
from medpruner_kernels._validation import check_or_defer

logger = logging.getLogger("medpruner")

IGNORE_INDEX = -100


@dataclass
class SliceLayout:
    """Host metadata of a request's images (one image per slice, volumes in batch-row order).

    tokens: LLM tokens per image; rows: leading-dim rows of the pixel tensor per image; source: the
    input named when the placeholders in ``input_ids`` do not match the images; token_pixels: pixel
    values of one LLM token, contiguous in an image's flattened pixels (the local IAF block), when the
    family's layout has them so."""

    tokens: list[int]
    rows: list[int]
    source: str
    token_pixels: int | None = None
    row_offsets: list[int] = field(init=False)
    token_offsets: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.row_offsets = host_offsets(self.rows)
        self.token_offsets = host_offsets(self.tokens)

    @property
    def num_images(self) -> int:
        return len(self.tokens)

    def mismatch_message(self) -> str:
        return (
            f"the image placeholders in input_ids do not match {self.source} "
            f"({self.num_images} images of {self.token_offsets[-1]} tokens)"
        )


@dataclass
class Encoded:
    """The vision tower's output for the encoded images, per LLM token (flat, in encoding order)."""

    output: Any
    features: torch.Tensor
    scores: torch.Tensor
    keys: torch.Tensor
    side: list[torch.Tensor] = field(default_factory=list)


@dataclass
class PrunedCall:
    """The request to hand to the original forward/generate, and what the caller needs afterwards."""

    call: dict[str, Any]
    original_input_ids: torch.Tensor
    pruned_length: int
    stats: Any
    record: PromptRecord | None = None


class Adapter:
    """The shared pipeline, patching, timing and stats; a family subclass supplies the hooks."""

    family = "base"
    default_temperature = 1.0
    pixel_key = "pixel_values"
    # tokens that open and close each image's placeholders (config attribute names)
    wrapper_ids = ("vision_start_token_id", "vision_end_token_id")
    type_ids_key = "mm_token_type_ids"
    # inputs the pruned call no longer carries (the encoder output replaces them)
    consumed_keys = ("pixel_values",)
    # the selection policy (None: MedPruner's, see :attr:`stages`); the eval sets a baseline's
    policy: Policy | None = None

    # --------------------------------------------------------------------------------- family hooks
    def vision_depth(self, model) -> int:
        raise NotImplementedError

    def check_call(self, call: dict[str, Any]) -> None:
        """Reject inputs the family cannot prune (ValueError naming them)."""

    def layout(self, model, call: dict[str, Any]) -> SliceLayout:
        raise NotImplementedError

    def iaf_slices(self, pixels: torch.Tensor, num_images: int) -> torch.Tensor:
        """``[num_images, -1]`` rows IAF compares, on the paper's [-1, 1] scale."""
        return pixels.reshape(num_images, -1)

    def encode(self, model, call, layout: SliceLayout, encoded: list[int] | None, layer: int, config) -> Encoded:
        raise NotImplementedError

    def position_inputs(self, model, call, attention_mask) -> tuple[dict[str, tuple[torch.Tensor, int]], Any]:
        """(tensors ``[..., B, L]`` to repack with the sequence, state for :meth:`finish_positions`),
        computed before any pruning work. The default (contiguous renumbering, the model's own when no
        ``position_ids`` are given) repacks only the caller's ``position_ids``, when given."""
        given = caller_positions(call)
        return ({} if given is None else {"position_ids": (given, 0)}), None

    def finish_positions(self, model, pruned: dict, repacked: dict, new_mask, removed: torch.Tensor, state) -> None:
        """Set the pruned call's positions; ``removed``: ``[B]`` tokens removed per row. The default
        hands over the caller's ``position_ids`` pruned with the sequence (none: the model numbers)."""
        if "position_ids" in repacked:
            pruned["position_ids"] = repacked["position_ids"]

    def package(self, encoded: Encoded, index: torch.Tensor):
        raise NotImplementedError

    def continuation_state(self, model) -> Any:
        """Position state a continuation from the pruned cache needs (read after finish_positions)."""
        return None

    def restore_continuation(self, model, state, repeats: int) -> None:
        """Put back :meth:`continuation_state` before a call continues a pruned cache (rows repeated
        ``repeats`` times when generate expanded them)."""

    def check_config(self, model, config) -> None:
        self.stages.check_config(config)
        depth = self.vision_depth(model)
        if not -depth <= config.importance_layer < depth:
            raise ValueError(
                f"importance_layer must be in [-{depth}, {depth - 1}] for this vision tower of {depth} "
                f"blocks, got {config.importance_layer}"
            )

    # ---------------------------------------------------------------------------------- the pipeline
    def unprunable(self, call: dict[str, Any]) -> str | None:
        """Why a request the model accepts cannot be pruned (it then runs unpruned, with a warning)."""
        if call.get("inputs_embeds") is not None:
            return "inputs_embeds instead of input_ids (the slices cannot be located)"
        return None

    def prune(self, model, config, call: dict[str, Any]) -> PrunedCall:
        if config.merge and model.training and torch.is_grad_enabled():
            # The merge kernels have no backward; the selection itself never needs one (it is taken
            # without gradients), so training prunes with merge=False.
            raise ValueError(
                "MedPrunerConfig.merge=True has no gradient: train with apply_medpruner(..., merge=False) "
                "(selection without gradients, the kept tokens differentiable), or run under torch.no_grad()"
            )
        self.check_call(call)
        input_ids = call["input_ids"]
        labels = call.get("labels")
        if labels is not None and tuple(labels.shape) != tuple(input_ids.shape):
            raise ValueError(
                f"labels must have the shape of input_ids {tuple(input_ids.shape)} to be pruned with the "
                f"sequence, got {tuple(labels.shape)}"
            )
        cfg = model.config
        device = input_ids.device
        attention_mask = call.get("attention_mask")
        layout = self.layout(model, call)
        n_img, total_tokens = layout.num_images, layout.token_offsets[-1]
        batch = input_ids.shape[0]
        valid, is_image, run_start = image_runs(input_ids, attention_mask, cfg.image_token_id)
        images_per_row = run_start.sum(1)
        # Checked before the positions: the model's own position code fails on a wrong image count
        # with an error that does not say so (Qwen's get_rope_index: StopIteration).
        check_or_defer(
            (images_per_row.sum() != n_img) | (is_image.sum() != total_tokens), layout.mismatch_message()
        )
        positions, position_state = self.position_inputs(model, call, attention_mask)
        volume_cu = F.pad(images_per_row.cumsum(0), (1, 0)).to(torch.int32)

        slice_keep, change = self._iaf(call, layout, volume_cu, config)
        # allocation="change": the counts follow each slice's change, split on the host after the read
        # of the IAF mask (the same one read: the counts are known before the encoder).
        change_budget = config.budget is not None and config.allocation == "change"
        tokens_dev = to_device(layout.tokens, device)
        # the batch row of each image; searched, not repeated, so that a wrong image count (reported by
        # the deferred check above) cannot fail here first
        image_row = torch.searchsorted(
            images_per_row.cumsum(0), torch.arange(n_img, device=device), right=True
        ).clamp(max=batch - 1)
        budget = None if change_budget else self._budget_counts(slice_keep, volume_cu, image_row, tokens_dev, config)
        # Flat [B*L] rank of every placeholder among the images' tokens (robust to a mismatch, which
        # the deferred check above reports): gathers replace a masked scatter that would fail first.
        rank = (torch.cumsum(is_image.reshape(-1), 0) - 1).clamp(0, max(total_tokens - 1, 0)).view_as(is_image)
        image_of_token = torch.arange(n_img, device=device).repeat_interleave(tokens_dev, output_size=total_tokens)

        fast = config.mode == "fast"
        # Every position the caller passed stays, in order, where pruning does not remove it, padding
        # included (masked as it was): a row keeps the caller's layout (right-padded rows stay
        # right-padded), whatever the other rows lose, and at identity settings the call is the
        # caller's. Only the padding columns every row can spare after pruning go (see row_span).
        right = padded_right(valid)
        span = row_span(valid | is_image, right)
        seq_base = torch.ones_like(valid)
        if fast:
            dropped_seq = is_image & (~slice_keep)[image_of_token][rank]
            seq_base = seq_base & ~dropped_seq & ~self._dropped_wrappers(cfg, input_ids, dropped_seq)
        row_counts = kept_counts = None
        if fast:
            reads = [images_per_row, slice_keep]
            if change_budget:
                reads += [(seq_base & span).sum(1), change]
            elif budget is not None:
                kept_tokens = torch.where(slice_keep, budget[0], 0)
                removed = torch.zeros(batch, dtype=torch.long, device=device)
                removed.index_add_(0, image_row, torch.where(slice_keep, tokens_dev - kept_tokens, 0))
                reads += [(seq_base & span).sum(1) - removed, kept_tokens]
            host = host_read(*reads, last=config.budget is not None)
            per_row, flags = host[0], host[1]
            if change_budget:
                budget, row_counts, kept_counts = self._change_budget(flags, host[3], host[2], per_row, layout.tokens,
                                                                      config, device)
            elif budget is not None:
                row_counts, kept_counts = host[2], host[3]
            encoded = [i for i in range(n_img) if flags[i]]
        else:
            encoded = list(range(n_img))
        all_encoded = len(encoded) == n_img

        layer = config.importance_layer % self.vision_depth(model)
        enc = self.encode(model, call, layout, None if all_encoded else encoded, layer, config)
        enc_tokens = [layout.tokens[i] for i in encoded]
        token_cu = to_device(host_offsets(enc_tokens), device, torch.int32)
        enc_budget = None
        if budget is not None:
            enc_index = None if all_encoded else to_device(encoded, device)
            enc_budget = tuple(b if enc_index is None else b[enc_index] for b in budget)
        enc_keep = slice_keep if all_encoded else None
        grid = self.token_grid(model, call) if self.stages.wants_grid else None
        keep, enc.features = self.select_tokens(
            enc.scores, enc.keys, enc.features, token_cu, enc_tokens, enc_keep, config, budget=enc_budget,
            slices=encoded, grid=grid,
        )

        if all_encoded:
            keep_all = keep
        else:
            ranges = [(layout.token_offsets[i], layout.token_offsets[i + 1]) for i in encoded]
            keep_all = torch.zeros(total_tokens, dtype=torch.bool, device=device)
            keep_all[range_index(ranges, device)] = keep
        seq_keep = seq_base & (~is_image | keep_all[rank])
        counts = (seq_keep & span).sum(1)
        if row_counts is None:
            kept_per_image = torch.zeros(n_img, dtype=torch.long, device=device)
            kept_per_image.index_add_(0, image_of_token, keep_all.long())
            if fast:
                row_counts, kept_counts = host_read(counts, kept_per_image, last=True)
            else:
                per_row, flags, row_counts, kept_counts = host_read(
                    images_per_row, slice_keep, counts, kept_per_image, last=True
                )
        length = max(row_counts)
        total_kept = sum(kept_counts)

        to_repack = {"input_ids": (input_ids, pad_token_id(cfg)), "attention_mask": (valid.long(), 0), **positions}
        if call.get(self.type_ids_key) is not None:
            to_repack[self.type_ids_key] = (call[self.type_ids_key], 0)
        if labels is not None:
            # The loss never predicts a row's first label (it has no token before it): nor does it
            # after pruning, where the filling in front of a shortened row would predict it.
            first_kept = seq_keep & (torch.cumsum(seq_keep, dim=1) == 1)
            to_repack["labels"] = (labels.masked_fill(first_kept, IGNORE_INDEX), IGNORE_INDEX)
        repacked = repack_sequences(seq_keep, length, to_repack, right=right)
        new_mask = repacked.pop("attention_mask")
        pruned = {k: v for k, v in call.items() if k not in self.consumed_keys and k != "position_ids"}
        pruned.update({k: v for k, v in repacked.items() if k not in positions})
        pruned["attention_mask"] = new_mask.to(attention_mask.dtype) if attention_mask is not None else new_mask
        removed = valid.sum(1) - (seq_keep & valid).sum(1)
        self.finish_positions(model, pruned, repacked, new_mask, removed, position_state)
        packaged = self.package(enc, compact_indices(keep, total_kept))
        pruned["mm_encoder_outputs"] = {"image": per_image_outputs(packaged, kept_counts)}
        record = PromptRecord(
            original_input_ids=input_ids,
            input_ids=pruned["input_ids"],
            attention_mask=pruned["attention_mask"],
            type_ids=pruned.get(self.type_ids_key),
            position_state=self.continuation_state(model),
        )

        volumes = count_ranges(per_row)
        stats = PruneStats(
            mode=config.mode,
            slices_total=list(per_row),
            slices_kept=[sum(flags[a:b]) for a, b in volumes],
            tokens_per_slice=[kept_counts[a:b] for a, b in volumes],
            tokens_before=total_tokens,
            tokens_after=total_kept,
            slices_encoded=len(encoded),
            budget=config.budget,
            **recorded_tokens(enc.scores, keep, config),
        )
        return PrunedCall(call=pruned, original_input_ids=input_ids, pruned_length=length, stats=stats, record=record)

    def _dropped_wrappers(self, cfg, input_ids, dropped_seq) -> torch.Tensor:
        """The start/end tokens around a dropped slice's placeholders (fast mode removes the whole span)."""
        start_id, end_id = (getattr(cfg, name) for name in self.wrapper_ids)
        next_dropped = F.pad(dropped_seq[:, 1:], (0, 1), value=False)
        prev_dropped = F.pad(dropped_seq[:, :-1], (1, 0), value=False)
        return ((input_ids == start_id) & next_dropped) | ((input_ids == end_id) & prev_dropped)

    # ------------------------------------------------------------------------------ the two stages
    @property
    def stages(self) -> Policy:
        """The selection policy the pipeline runs: :attr:`policy` when set, else MedPruner's."""
        return self.policy if self.policy is not None else MedPrunerPolicy()

    def local_blocks(self, rows: torch.Tensor, num_images: int, layout: SliceLayout, config):
        """(rows, block) for the local IAF rule: ``rows`` as :meth:`iaf_slices` gives them, reordered if
        need be so that each block of ``block`` contiguous values is the pixels of one LLM token. The
        default takes ``config.iaf_block``, else the layout's ``token_pixels``."""
        block = config.iaf_block if config.iaf_block is not None else layout.token_pixels
        if block is None:
            raise ValueError(f"{type(self).__name__}: iaf='local' needs MedPrunerConfig.iaf_block here (the "
                             "pixels of one LLM token are not known for this family)")
        return rows, block

    def _iaf(self, call, layout: SliceLayout, volume_cu: torch.Tensor, config):
        """The policy's slice stage over every volume of the batch (the pixels as :meth:`iaf_slices`
        gives them): one call per run of equally sized images (usually one). A size change inside a
        volume is reported through the deferred checks. Returns (keep, change): change, float32 per
        image, only when the policy gives it (``allocation="change"``), else None."""
        policy = self.stages
        pixels = call[self.pixel_key]
        n_img = layout.num_images
        groups, start = [], 0
        for i in range(1, n_img + 1):
            if i == n_img or layout.rows[i] != layout.rows[start]:
                groups.append((start, i))
                start = i
        keeps, changes = [], []
        for start, end in groups:
            rows = self.iaf_slices(pixels[layout.row_offsets[start] : layout.row_offsets[end]], end - start)
            block = None
            if config.iaf == "local" or policy.wants_blocks:
                rows, block = self.local_blocks(rows, end - start, layout, config)
            cu = volume_cu if len(groups) == 1 else (volume_cu.clamp(start, end) - start).to(torch.int32)
            if len(groups) > 1 and start > 0:
                check_or_defer(
                    ~(volume_cu == start).any(),
                    "all slices of a volume must share one resolution (the image sizes change inside a "
                    "volume); pin it with volume_to_inputs(resolution=...)",
                )
            selected = policy.select_slices(
                rows,
                cu,
                config=config,
                max_seqlen=end - start,
                slice_tokens=layout.tokens[start:end],
                first=start,
                iaf_block=block,
            )
            keep, change = selected if isinstance(selected, tuple) else (selected, None)
            keeps.append(keep)
            changes.append(change)
        if any(c is None for c in changes):
            changes = [None]
        if len(keeps) == 1:
            return keeps[0], changes[0]
        return torch.cat(keeps), (None if changes[0] is None else torch.cat(changes))

    # --------------------------------------------------------------------------------------- budget
    @staticmethod
    def _change_budget(flags, change, spans, per_row, tokens, config, device):
        """``allocation="change"`` from the host values of the one read: (per image budget counts on
        the device, tokens per row after pruning, tokens kept per image)."""
        share, picks, targets = change_counts(config.budget, flags, change, per_row, tokens, merge=config.merge,
                                              context_frac=config.context_frac)
        kept_counts = [b if f else 0 for b, f in zip(share, flags, strict=True)]
        row_counts = [spans[r] - sum(tokens[i] - kept_counts[i] for i in range(a, b) if flags[i])
                      for r, (a, b) in enumerate(count_ranges(per_row))]
        budget = tuple(to_device(v, device) for v in (share, picks, targets))
        return budget, row_counts, kept_counts

    @staticmethod
    def _budget_counts(slice_keep, volume_cu, image_row, tokens, config):
        """Per image, on the device: (tokens kept, of which DINS picks, contextual targets) under the
        config's fixed budget (:func:`medpruner.config.budget_counts`, the device form of
        ``budget_split``), or None without a budget. Only the IAF mask decides them."""
        return budget_counts(
            config.budget,
            slice_keep,
            image_row,
            tokens,
            volume_cu.numel() - 1,
            merge=config.merge,
            context_frac=config.context_frac,
        )

    def select_tokens(self, scores, keys, pooled, token_cu, enc_tokens, slice_keep, config, budget=None, *,
                      slices=None, grid=None):
        """The policy's token stage over the encoded slices -> (final keep mask, features to gather from).

        scores/keys/pooled: per LLM token of the encoded slices (flat, ``token_cu`` offsets, ``enc_tokens``
        the host counts); slice_keep: the IAF mask of the encoded slices in paper mode (every slice
        encoded), None in fast mode; budget: per encoded slice (kept, DINS picks, targets); slices: the
        batch indices of the encoded images (None: all); grid: their token grids (see ``wants_grid``)."""
        return self.stages.select_tokens(
            scores, keys, pooled, token_cu, slice_keep, budget, config=config,
            temperature=config.resolved_temperature(self.default_temperature), slice_tokens=enc_tokens,
            slices=slices, grid=grid,
        )

    def token_grid(self, model, call) -> list[tuple[int, int]] | None:
        """(rows, cols) of LLM tokens per image where the processor says (a host read), for the policies
        that want it; None: a square grid per image."""
        return None

    # ------------------------------------------------- patching (the wrappers are in patching.py)
    def wants_pruning(self, call: dict[str, Any]) -> bool:
        if call.get(self.pixel_key) is None or call.get("input_ids") is None:
            return False
        cache = _cache_of(call)
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
        # What the instance itself holds (e.g. accelerate's device-map hook on forward) is restored
        # by unpatch; the class methods need nothing.
        saved = {name: model.__dict__[name] for name in _PATCHED_NAMES if name in model.__dict__}
        for name in _PATCHED_NAMES:
            model.__dict__[name] = PatchedMethod(model, name)
        setattr(model, _PATCH_ATTR, (config, self, saved))
        model.medpruner_config = config
        model.medpruner_stats = None


# ------------------------------------------------------------------------------- shared surgery
