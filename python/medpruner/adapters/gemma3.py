"""Gemma3 / MedGemma hooks (the pipeline itself is ``base.Adapter.prune``).

Each slice is one image: ``<start_of_image>`` + ``mm_tokens_per_image`` (256) image tokens +
``<end_of_image>``. The SigLIP tower encodes a slice into a 64 x 64 grid of patches, and the projector
average-pools 4 x 4 *spatial* blocks of that grid into the 16 x 16 LLM tokens. The token importance is
therefore the attention-received score of the patches (last SigLIP layer, from its q/k projections)
pooled, in fast mode, over the same 4 x 4 spatial blocks the projector pools. ``mode="paper"`` pools as
the published code does: 16 consecutive raster patches (a 1 x 16 strip of the 64 x 64 grid, which mixes
patches of different tokens and does not match the projector), so that it keeps the paper's tokens. The
merge keys are the head-averaged keys pooled the same way as the scores (docs/PAPER_MODE.md).

IAF runs on the processor's pixel tensor (mean = std = 0.5, the paper's scale). In fast mode a dropped
slice loses its ``<start_of_image>..<end_of_image>`` span (the "SLICE i:" prefix stays). Positions are
renumbered contiguously over the pruned sequence (1-D RoPE: the model numbers them when no
``position_ids`` are given; a caller's ``position_ids`` are pruned with the sequence), and
``token_type_ids`` are repacked so the bidirectional attention inside each image block covers the kept
tokens of that block. Temperature 2 by default.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from medpruner.adapters.base import Adapter, Encoded, SliceLayout
from medpruner.adapters.sequences import block_scores, to_device

CHANNELS = 3  # SigLIP's RGB input


class Gemma3Adapter(Adapter):
    family = "medgemma"
    default_temperature = 2.0
    wrapper_ids = ("boi_token_id", "eoi_token_id")
    type_ids_key = "token_type_ids"

    def vision_depth(self, model) -> int:
        return len(_encoder_layers(model.model.vision_tower))

    def layout(self, model, call) -> SliceLayout:
        num_images = call["pixel_values"].shape[0]
        return SliceLayout(tokens=[_tokens_per_image(model)] * num_images, rows=[1] * num_images, source="pixel_values")

    def local_blocks(self, rows, num_images, layout, config):
        """SigLIP's pixels are ``[C, S, S]`` per image and the projector pools an ``S/side``-pixel square
        into each LLM token: the rows are reordered so that each square (all channels) is contiguous."""
        if config.iaf_block is not None:
            return rows, config.iaf_block
        side = math.isqrt(layout.tokens[0])
        size = math.isqrt(rows.shape[1] // CHANNELS)
        if side * side != layout.tokens[0] or CHANNELS * size * size != rows.shape[1] or size % side:
            raise ValueError(f"Gemma3Adapter: iaf='local' needs square images whose side ({size}) the token grid "
                             f"({layout.tokens[0]} tokens) divides; set MedPrunerConfig.iaf_block")
        tile = size // side
        tiled = rows.reshape(num_images, CHANNELS, side, tile, side, tile).permute(0, 2, 4, 1, 3, 5)
        return tiled.reshape(num_images, -1), CHANNELS * tile * tile

    def encode(self, model, call, layout, encoded, layer, config) -> Encoded:
        inner = model.model
        pixels = call["pixel_values"]
        if encoded is not None:
            pixels = pixels.index_select(0, to_device(encoded, pixels.device))
        captured: dict = {}
        with self._capture(inner, layer, config, captured):
            out = inner.get_image_features(pixels.to(inner.vision_tower.dtype), return_dict=True)
        features = out.pooler_output.reshape(pixels.shape[0] * _tokens_per_image(model), -1)
        return Encoded(out, features, captured["scores"], captured["keys"])

    def package(self, encoded: Encoded, index: torch.Tensor):
        return type(encoded.output)(pooler_output=encoded.features.index_select(0, index))

    @contextmanager
    def _capture(self, inner, layer: int, config, captured: dict):
        """Score the patches at SigLIP layer ``layer`` from its q/k projections (no RoPE in SigLIP), while
        the layer runs its own attention, then pool scores and keys per LLM token: over the projector's
        spatial blocks in fast mode, over strips of ``kernel**2`` consecutive raster patches in paper mode
        (the published code's fixed 16 for MedGemma's 4 x 4 kernel)."""
        from medpruner_kernels import attention_importance

        attn = _encoder_layers(inner.vision_tower)[layer].self_attn
        projector = inner.multi_modal_projector
        side, kernel = projector.patches_per_image, projector.kernel_size
        strip = kernel * kernel if config.mode == "paper" else None
        if strip is not None and side % kernel:
            raise ValueError(
                f'mode="paper" pools each token over {strip} consecutive patches, as the published code '
                f"does, which needs the projector's {kernel} x {kernel} blocks to tile the {side} x {side} "
                'patch grid; they do not for this model: use mode="fast"'
            )
        state: dict = {}

        # detached: the selection takes no gradient, so a checkpointed layer saves the same tensors
        # when it is recomputed without these hooks
        def take_q(module, args, output):
            state["q"] = output.detach()

        def take_k(module, args, output):
            state["k"] = output.detach()

        def score(module, args, output):
            q, k = state.pop("q"), state.pop("k")
            images, patches = q.shape[:2]
            q = q.reshape(images * patches, attn.num_heads, -1)
            k = k.reshape(images * patches, attn.num_heads, -1)
            cu = torch.arange(images + 1, dtype=torch.int32, device=q.device) * patches
            if strip is not None:
                captured["scores"], captured["keys"] = block_scores(q, k, cu, attn.scale, strip, config.backend)
                return
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


def _tokens_per_image(model) -> int:
    """LLM tokens per image: the projector pools the patch grid to ``int(sqrt(mm_tokens_per_image))``
    tokens a side, so a non-square ``mm_tokens_per_image`` gives fewer tokens than it says."""
    projector = model.model.multi_modal_projector
    return (projector.patches_per_image // projector.kernel_size) ** 2


def _encoder_layers(tower):
    """The SigLIP blocks: transformers 5 keeps the encoder on the tower itself, 4.x under ``vision_model``."""
    encoder = getattr(tower, "encoder", None) or tower.vision_model.encoder
    return encoder.layers
