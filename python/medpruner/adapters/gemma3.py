"""Gemma3 / MedGemma adapter.

Each slice is one image: ``<start_of_image>`` + ``mm_tokens_per_image`` (256) image tokens +
``<end_of_image>``. The SigLIP tower encodes a slice into a 64 x 64 grid of patches, and the projector
average-pools 4 x 4 *spatial* blocks of that grid into the 16 x 16 LLM tokens. The token importance is
therefore the attention-received score of the patches (last SigLIP layer, from its q/k projections)
pooled over the same 4 x 4 spatial blocks the projector pools, not over 16 consecutive raster patches as
the paper's code does (which mixes patches of different rows and does not match the projector). The
merge keys are the head-averaged keys pooled the same way.

IAF runs on the processor's pixel tensor (mean = std = 0.5, values in [-1, 1], the paper's scale). In
fast mode a dropped slice loses its ``<start_of_image>..<end_of_image>`` span (the surrounding text, e.g.
the "SLICE i:" prefix and the blank lines, stays); in paper mode it keeps its first token. Positions are
renumbered contiguously over the pruned sequence (Gemma3 has 1-D RoPE), and ``token_type_ids`` are
repacked so the bidirectional attention inside each image block covers the kept tokens of that block.
Temperature 2 by default.
"""

from __future__ import annotations

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
    recorded_tokens,
    repack_sequences,
    segment_offsets,
)


class Gemma3Adapter(Adapter):
    family = "gemma3"
    default_temperature = 2.0

    def vision_depth(self, model) -> int:
        return len(_encoder_layers(model.model.vision_tower))

    def prune(self, model, config, call) -> PrunedCall:
        from medpruner.pipeline import PruneStats
        from medpruner_kernels import iaf_select

        if call.get("inputs_embeds") is not None:
            raise ValueError("medpruner needs input_ids to locate the slices; inputs_embeds is not supported")
        input_ids = call["input_ids"]
        pixel_values = call["pixel_values"]
        inner, cfg = model.model, model.config
        device = input_ids.device
        attention_mask = call.get("attention_mask")
        valid, is_image, run_start = image_runs(input_ids, attention_mask, cfg.image_token_id)
        batch = input_ids.shape[0]
        num_images = pixel_values.shape[0]
        per_image = cfg.mm_tokens_per_image
        meta = torch.cat([run_start.sum(1), is_image.sum().view(1)]).tolist()
        images_per_row = meta[:batch]
        if sum(images_per_row) != num_images or meta[-1] != num_images * per_image:
            raise ValueError(
                f"image tokens in input_ids ({meta[-1]} in {sum(images_per_row)} runs) do not match "
                f"pixel_values ({num_images} images of {per_image} tokens)"
            )
        volumes = count_ranges(images_per_row)
        slice_keep = iaf_select(
            pixel_values.reshape(num_images, -1),
            float(config.gamma),
            cu_seqlens=segment_offsets(images_per_row, device),
            max_seqlen=max(images_per_row),
            backend=config.backend,
        )
        if config.mode == "fast":
            kept_list = slice_keep.tolist()
            encoded = [i for i in range(num_images) if kept_list[i]]
        else:
            encoded = list(range(num_images))
        all_encoded = len(encoded) == num_images
        enc_index = None if all_encoded else torch.tensor(encoded, device=device)
        enc_pixels = pixel_values if all_encoded else pixel_values.index_select(0, enc_index)

        layer = config.importance_layer % self.vision_depth(model)
        captured: dict = {}
        with self._capture(inner, layer, config, captured):
            out = inner.get_image_features(enc_pixels.to(inner.vision_tower.dtype), return_dict=True)
        pooled = out.pooler_output.reshape(len(encoded) * per_image, -1)
        enc_tokens = [per_image] * len(encoded)
        token_cu = segment_offsets(enc_tokens, device)
        keep, features = self.select_tokens(
            captured["scores"], captured["keys"], pooled, token_cu, enc_tokens, slice_keep, config
        )

        total_tokens = num_images * per_image
        if all_encoded:
            keep_all = keep
        else:
            offsets = host_offsets([per_image] * num_images)
            keep_all = torch.zeros(total_tokens, dtype=torch.bool, device=device)
            keep_all[range_index([(offsets[i], offsets[i + 1]) for i in encoded], device)] = keep
        image_keep = torch.zeros_like(is_image).masked_scatter(is_image, keep_all)
        seq_keep = valid & (~is_image | image_keep)
        if config.mode == "fast" and not all_encoded:
            dropped = (~slice_keep).repeat_interleave(per_image)
            dropped_seq = torch.zeros_like(is_image).masked_scatter(is_image, dropped)
            next_dropped = F.pad(dropped_seq[:, 1:], (0, 1), value=False)
            prev_dropped = F.pad(dropped_seq[:, :-1], (1, 0), value=False)
            seq_keep &= ~((input_ids == cfg.boi_token_id) & next_dropped)
            seq_keep &= ~((input_ids == cfg.eoi_token_id) & prev_dropped)

        counts = seq_keep.sum(1)
        kept_per_image = keep_all.view(num_images, per_image).sum(1)
        host = torch.cat([counts, kept_per_image, slice_keep.long()]).tolist()
        row_counts = host[:batch]
        tokens_kept = host[batch : batch + num_images]
        slice_flags = host[batch + num_images :]
        length = max(row_counts)
        total_kept = sum(tokens_kept)

        to_repack = {"input_ids": (input_ids, pad_token_id(cfg))}
        if call.get("token_type_ids") is not None:
            to_repack["token_type_ids"] = (call["token_type_ids"], 0)
        repacked, new_mask = repack_sequences(seq_keep, counts, length, to_repack)
        index = compact_indices(keep, total_kept)
        encoded_output = type(out)(pooler_output=features.index_select(0, index))

        pruned = {k: v for k, v in call.items() if k not in ("pixel_values", "position_ids")}
        pruned.update(repacked)
        pruned.update(
            attention_mask=new_mask.to(attention_mask.dtype) if attention_mask is not None else new_mask,
            mm_encoder_outputs={"image": encoded_output},
        )
        stats = PruneStats(
            mode=config.mode,
            slices_total=list(images_per_row),
            slices_kept=[sum(slice_flags[a:b]) for a, b in volumes],
            tokens_per_slice=[tokens_kept[a:b] for a, b in volumes],
            tokens_before=total_tokens,
            tokens_after=total_kept,
            slices_encoded=len(encoded),
            **recorded_tokens(captured["scores"], keep, config),
        )
        return PrunedCall(call=pruned, original_input_ids=input_ids, pruned_length=length, stats=stats)

    @contextmanager
    def _capture(self, inner, layer: int, config, captured: dict):
        """Score the patches at SigLIP layer ``layer`` from its q/k projections (no RoPE in SigLIP), while
        the layer runs its own attention, then pool scores and keys over the projector's spatial blocks."""
        from medpruner_kernels.importance import attention_importance

        attn = _encoder_layers(inner.vision_tower)[layer].self_attn
        projector = inner.multi_modal_projector
        side, kernel = projector.patches_per_image, projector.kernel_size
        state: dict = {}

        def take_q(module, args, output):
            state["q"] = output

        def take_k(module, args, output):
            state["k"] = output

        def score(module, args, output):
            q, k = state.pop("q"), state.pop("k")
            images, patches = q.shape[:2]
            q = q.reshape(images * patches, attn.num_heads, -1)
            k = k.reshape(images * patches, attn.num_heads, -1)
            cu = segment_offsets([patches] * images, q.device)
            received = attention_importance(q, k, cu_seqlens=cu, scale=attn.scale, backend=config.backend)
            grid = received.view(images, 1, side, side)
            captured["scores"] = F.avg_pool2d(grid, kernel).reshape(-1)
            keys = k.float().mean(dim=1).view(images, side, side, -1).permute(0, 3, 1, 2)
            pooled = F.avg_pool2d(keys, kernel)
            captured["keys"] = pooled.flatten(2).transpose(1, 2).reshape(-1, pooled.shape[1])

        handles = [
            attn.q_proj.register_forward_hook(take_q),
            attn.k_proj.register_forward_hook(take_k),
            attn.register_forward_hook(score),
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


def _encoder_layers(tower):
    """The SigLIP blocks: transformers 5 keeps the encoder on the tower itself, 4.x under ``vision_model``."""
    encoder = getattr(tower, "encoder", None) or tower.vision_model.encoder
    return encoder.layers
