"""Qwen3-VL adapter (and the Qwen-family machinery Qwen2.5-VL reuses).

A volume is a sequence of images, one per slice: ``<|vision_start|><|image_pad|>*n<|vision_end|>``. The
processor packs each slice as ``t*h*w`` flattened patches; the vision tower's merger turns every 2x2
block of patches (4 consecutive rows of ``pixel_values``) into one LLM token, so the token importance is
the attention-received score of the patches averaged over groups of 4.

Pipeline per request (all volumes of the batch at once):

1. IAF on the processor's normalised pixel patches (mean = std = 0.5 for Qwen3-VL, so the paper's
   gamma applies as is), one call over the varlen batch of volumes.
2. The vision tower runs once: on the kept slices only (``mode="fast"``) or on every slice
   (``mode="paper"``). Hooks on block ``importance_layer`` capture its post-RoPE q/k; the tower keeps its
   own SDPA/flash attention, and ``attention_importance`` scores the tokens without an N x N matrix.
3. DINS (``nucleus_select``, temperature 2 by default) per slice, then the contextual merge; deepstack
   features are filtered with the same final mask (never merged).
4. The sequence is rebuilt: kept placeholders, the M-RoPE coordinates each kept token had in the full
   grid (from ``get_rope_index`` on the unpruned inputs), rope deltas continuing the unpruned numbering,
   and left padding. In fast mode a dropped slice loses its whole ``<|vision_start|>..<|vision_end|>``
   span; in paper mode it keeps its first token.

Host syncs: the image metadata (``image_grid_thw``, images per row) is read once, as the Hugging Face
vision tower does anyway; fast mode reads the IAF mask once (the tower's input size depends on it); the
kept-token counts are read once to size the pruned sequence.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from medpruner.adapters import (
    Adapter,
    PrunedCall,
    compact_indices,
    count_ranges,
    host_offsets,
    image_runs,
    pad_token_id,
    range_index,
    range_lengths,
    recorded_tokens,
    repack_sequences,
    segment_offsets,
)


class QwenVLAdapter(Adapter):
    """Shared by Qwen3-VL and Qwen2.5-VL: M-RoPE, grouped merger, one image per slice."""

    has_deepstack = False

    def vision_depth(self, model) -> int:
        return len(model.model.visual.blocks)

    # ----------------------------------------------------------------------- family-specific hooks
    def window_order(self, visual, grid_thw: torch.Tensor) -> torch.Tensor | None:
        """Permutation of merged tokens the tower applies before its blocks (None: identity)."""
        return None

    def rope_index(self, model, call, attention_mask):
        return model.model.get_rope_index(
            call["input_ids"],
            mm_token_type_ids=call["mm_token_type_ids"],
            image_grid_thw=call["image_grid_thw"],
            attention_mask=attention_mask,
        )

    def encoder_output(self, out, features: torch.Tensor, side: list[torch.Tensor]):
        return type(out)(pooler_output=(features,))

    # ---------------------------------------------------------------------------------- the prune
    def prune(self, model, config, call) -> PrunedCall:
        from medpruner.pipeline import PruneStats

        if call.get("pixel_values_videos") is not None:
            raise ValueError(
                "medpruner prunes image slices; video inputs (pixel_values_videos) are not supported"
            )
        if call.get("inputs_embeds") is not None:
            raise ValueError("medpruner needs input_ids to locate the slices; inputs_embeds is not supported")
        input_ids = call["input_ids"]
        pixel_values = call["pixel_values"]
        grid = call.get("image_grid_thw")
        if grid is None:
            raise ValueError("image_grid_thw is required with pixel_values")
        if call.get("mm_token_type_ids") is None:
            raise ValueError("mm_token_type_ids is required (the processor returns it with input_ids)")
        inner, cfg = model.model, model.config
        visual = inner.visual
        device = input_ids.device
        attention_mask = call.get("attention_mask")
        valid, is_image, run_start = image_runs(input_ids, attention_mask, cfg.image_token_id)

        batch = input_ids.shape[0]
        num_images = grid.shape[0]
        meta = torch.cat(
            [grid.reshape(-1).to(device, torch.long), run_start.sum(1), is_image.sum().view(1)]
        ).tolist()
        grids = [tuple(meta[3 * i : 3 * i + 3]) for i in range(num_images)]
        images_per_row = meta[3 * num_images : 3 * num_images + batch]
        unit = visual.spatial_merge_size**2
        patches = [t * h * w for t, h, w in grids]
        tokens = [p // unit for p in patches]
        if sum(images_per_row) != num_images or meta[-1] != sum(tokens):
            raise ValueError(
                f"image placeholders in input_ids ({meta[-1]} tokens in {sum(images_per_row)} runs) do not "
                f"match image_grid_thw ({sum(tokens)} tokens in {num_images} images)"
            )
        volumes = count_ranges(images_per_row)

        slice_keep = self._iaf(pixel_values, patches, volumes, config)
        if config.mode == "fast":
            kept_list = slice_keep.tolist()
            encoded = [i for i in range(num_images) if kept_list[i]]
        else:
            encoded = list(range(num_images))
        all_encoded = len(encoded) == num_images
        patch_offsets = host_offsets(patches)
        token_offsets = host_offsets(tokens)
        if all_encoded:
            enc_pixels, enc_grid = pixel_values, grid
        else:
            rows = range_index([(patch_offsets[i], patch_offsets[i + 1]) for i in encoded], device)
            enc_pixels = pixel_values.index_select(0, rows.to(pixel_values.device))
            enc_grid = grid[torch.tensor(encoded, device=grid.device)]

        layer = config.importance_layer % self.vision_depth(model)
        captured: dict = {}
        with self._capture(visual, layer, unit, config, captured):
            out = visual(enc_pixels.type(visual.dtype), grid_thw=enc_grid, return_dict=True)
        scores, keys = captured["scores"], captured["keys"]
        order = self.window_order(visual, enc_grid)
        if order is not None:
            inverse = torch.argsort(order.to(scores.device))
            scores, keys = scores[inverse], keys[inverse]
        pooled = out.pooler_output
        side = list(out.deepstack_features) if self.has_deepstack else []

        enc_tokens = [tokens[i] for i in encoded]
        token_cu = segment_offsets(enc_tokens, device)
        keep, features = self.select_tokens(scores, keys, pooled, token_cu, enc_tokens, slice_keep, config)

        total_tokens = sum(tokens)
        if all_encoded:
            keep_all = keep
        else:
            keep_all = torch.zeros(total_tokens, dtype=torch.bool, device=device)
            keep_all[range_index([(token_offsets[i], token_offsets[i + 1]) for i in encoded], device)] = keep
        image_keep = torch.zeros_like(is_image).masked_scatter(is_image, keep_all)
        seq_keep = valid & (~is_image | image_keep)
        if config.mode == "fast" and not all_encoded:
            tokens_t = torch.tensor(tokens, device=device)
            dropped = (~slice_keep).repeat_interleave(tokens_t, output_size=total_tokens)
            dropped_seq = torch.zeros_like(is_image).masked_scatter(is_image, dropped)
            next_dropped = F.pad(dropped_seq[:, 1:], (0, 1), value=False)
            prev_dropped = F.pad(dropped_seq[:, :-1], (1, 0), value=False)
            seq_keep &= ~((input_ids == cfg.vision_start_token_id) & next_dropped)
            seq_keep &= ~((input_ids == cfg.vision_end_token_id) & prev_dropped)

        counts = seq_keep.sum(1)
        image_of_token = torch.arange(num_images, device=device).repeat_interleave(
            torch.tensor(tokens, device=device), output_size=total_tokens
        )
        kept_per_image = torch.zeros(num_images, dtype=torch.long, device=device)
        kept_per_image.index_add_(0, image_of_token, keep_all.long())
        host = torch.cat([counts, kept_per_image, slice_keep.long()]).tolist()
        row_counts = host[:batch]
        per_image = host[batch : batch + num_images]
        slice_flags = host[batch + num_images :]
        length = max(row_counts)
        total_kept = sum(per_image)

        position_ids, rope_deltas = self.rope_index(model, call, attention_mask)
        pad_id = pad_token_id(cfg)
        repacked, new_mask = repack_sequences(
            seq_keep,
            counts,
            length,
            {
                "input_ids": (input_ids, pad_id),
                "mm_token_type_ids": (call["mm_token_type_ids"], 0),
                "position_ids": (position_ids.to(device), 0),
            },
        )
        text_positions = (new_mask.cumsum(-1) - 1).masked_fill(new_mask == 0, 0)
        new_positions = torch.cat([text_positions.unsqueeze(0), repacked["position_ids"]], dim=0)
        # Decoding continues after the unpruned sequence's last position (the rows' pruned length
        # is shorter, so the delta grows by the tokens removed).
        inner.rope_deltas = rope_deltas.to(device).view(batch, 1) + (valid.sum(1) - counts).view(batch, 1)

        index = compact_indices(keep, total_kept)
        kept_features = features.index_select(0, index)
        kept_side = [s.index_select(0, index) for s in side]

        pruned = {k: v for k, v in call.items() if k not in ("pixel_values", "image_grid_thw")}
        pruned.update(
            input_ids=repacked["input_ids"],
            attention_mask=new_mask.to(attention_mask.dtype) if attention_mask is not None else new_mask,
            mm_token_type_ids=repacked["mm_token_type_ids"],
            position_ids=new_positions,
            mm_encoder_outputs={"image": self.encoder_output(out, kept_features, kept_side)},
        )
        stats = PruneStats(
            mode=config.mode,
            slices_total=list(images_per_row),
            slices_kept=[sum(slice_flags[a:b]) for a, b in volumes],
            tokens_per_slice=[per_image[a:b] for a, b in volumes],
            tokens_before=total_tokens,
            tokens_after=total_kept,
            slices_encoded=len(encoded),
            **recorded_tokens(scores, keep, config),
        )
        return PrunedCall(call=pruned, original_input_ids=input_ids, pruned_length=length, stats=stats)

    # ------------------------------------------------------------------------------------- stages
    def _iaf(self, pixel_values, patches, volumes, config) -> torch.Tensor:
        """IAF over every volume of the batch: one call per distinct slice size (usually one)."""
        from medpruner_kernels import iaf_select

        device = pixel_values.device
        by_size: dict[int, list[tuple[int, int]]] = {}
        for start, end in volumes:
            sizes = set(patches[start:end])
            if len(sizes) > 1:
                raise ValueError(
                    "all slices of a volume must share one resolution (got patch counts "
                    f"{sorted(sizes)}); pin it with volume_to_inputs(resolution=...)"
                )
            if end > start:
                by_size.setdefault(patches[start], []).append((start, end))
        num_images = len(patches)
        patch_offsets = host_offsets(patches)
        if len(by_size) == 1:
            slices = pixel_values.reshape(num_images, -1)
            lengths = range_lengths(volumes)
            return iaf_select(
                slices,
                float(config.gamma),
                cu_seqlens=segment_offsets(lengths, device),
                max_seqlen=max(lengths),
                backend=config.backend,
            )
        keep = torch.ones(num_images, dtype=torch.bool, device=device)
        for group in by_size.values():
            images = [i for start, end in group for i in range(start, end)]
            rows = range_index([(patch_offsets[i], patch_offsets[i + 1]) for i in images], device)
            slices = pixel_values.index_select(0, rows).reshape(len(images), -1)
            lengths = range_lengths(group)
            keep[torch.tensor(images, device=device)] = iaf_select(
                slices,
                float(config.gamma),
                cu_seqlens=segment_offsets(lengths, device),
                max_seqlen=max(lengths),
                backend=config.backend,
            )
        return keep

    @contextmanager
    def _capture(self, visual, layer: int, unit: int, config, captured: dict):
        """Score the tokens at block ``layer`` from its post-RoPE q/k while the block runs its own
        attention: a pre-hook takes the rotary tables and segment offsets, a hook on the qkv projection
        takes q/k as they are produced, so nothing of size N x N and no extra projection is computed."""
        from medpruner_kernels.importance import attention_importance

        attn = visual.blocks[layer].attn
        rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb_vision
        state: dict = {}

        def take_inputs(module, args, kwargs):
            state["rope"] = kwargs["position_embeddings"]
            state["cu"] = kwargs["cu_seqlens"]

        def take_qkv(module, args, output):
            n = output.shape[0]
            q, k, _ = output.reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
            cos, sin = state["rope"]
            q, k = rope(q, k, cos, sin)
            captured["scores"] = attention_importance(
                q,
                k,
                cu_seqlens=state["cu"].to(torch.int32),
                scale=attn.scaling,
                group=unit,
                backend=config.backend,
            )
            captured["keys"] = k.float().mean(dim=1).reshape(n // unit, unit, -1).mean(dim=1)

        handles = [
            attn.register_forward_pre_hook(take_inputs, with_kwargs=True),
            attn.qkv.register_forward_hook(take_qkv),
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


class Qwen3VLAdapter(QwenVLAdapter):
    family = "qwen3_vl"
    default_temperature = 2.0
    has_deepstack = True

    def encoder_output(self, out, features, side):
        return type(out)(pooler_output=(features,), deepstack_features=[(s,) for s in side])
