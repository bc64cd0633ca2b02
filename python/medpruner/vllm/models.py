"""The model classes: vLLM's Qwen3-VL and Qwen2.5-VL with MedPruner's token selection.

``embed_multimodal`` encodes the kept slices only (the processor removed the dropped ones), scores
the tokens at block ``importance_layer`` from the post-RoPE q/k that block hands to its own attention
(a pre-hook; ``attention_importance`` computes the scores, the tower's attention is untouched), then
selects and merges exactly each slice's budgeted count with ``Adapter.select_tokens`` (the HF path's
code). Qwen3-VL's deepstack features are filtered with the same keep mask, never merged.

Positions. vLLM computes a request's M-RoPE positions once, before the tower runs, so it cannot know
which tokens of a slice survive. ``get_mrope_input_positions`` therefore gives every kept image token
the base (t, h, w) of its slice and keeps the unpruned positions of everything else (a dropped slice
leaves its gap); each selected token's offset inside the full grid rides along as three extra channels
of its embedding (so it survives the encoder cache and prefill chunks cut inside a slice), which
``embed_input_ids`` strips into a persistent ``[3, max_num_batched_tokens]`` buffer and ``forward`` adds
to the positions. Decoding continues after the unpruned sequence's last position, as in the HF path.

CUDA graphs. ``forward`` reads the offsets from that buffer (fixed address) and zeroes what it read,
with no Python branch on whether a step has any: a captured graph replays exactly that, so the offsets
reach the language model under ``cudagraph_mode=FULL`` (mixed batches replayed) and in a decode graph
that happens to replay a one-token prefill chunk inside a slice (FULL_AND_PIECEWISE, FULL_DECODE_ONLY).
``embed_input_ids`` runs eagerly before every forward in both model runners (V1 and V2).
"""

from __future__ import annotations

import numpy as np
import torch

from medpruner.adapters.base import Adapter
from medpruner.adapters.qwen2_5_vl import Qwen25VLAdapter
from medpruner.adapters.qwen3_vl import Qwen3VLAdapter
from medpruner.adapters.sequences import block_scores, compact_indices, host_offsets, host_read, to_device
from medpruner.vllm import _compat

_compat.check()  # this module also loads in processes that never ran register() (model inspection)

from medpruner.vllm._compat import (  # noqa: E402
    MULTIMODAL_REGISTRY,
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
    Qwen3VLDummyInputsBuilder,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMultiModalProcessor,
    Qwen3VLProcessingInfo,
    copy_mm_embedding_modality,
)
from medpruner.vllm.engine import serving_config  # noqa: E402
from medpruner.vllm.processor import COUNTS_KEY, processor_class  # noqa: E402

POSITION_CHANNELS = 3


def grid_offsets(grid_thw: list[list[int]], merge_size: int, device) -> torch.Tensor:
    """``[tokens, 3]`` (t, h, w) of every merged token inside its image's grid, images in order, each
    in raster order (the order of the tower's output and of vLLM's M-RoPE)."""
    parts = []
    for t, h, w in grid_thw:
        parts.append(torch.from_numpy(np.indices((t, h // merge_size, w // merge_size)).reshape(3, -1).T.copy()))
    return torch.cat(parts).to(device)


class PositionOffsets(torch.nn.Module):
    """The (t, h, w) offsets of the current step's image tokens inside their slices, ``[3, width]``
    long at a fixed address: :meth:`write` (eager, before the forward) sets them, :meth:`apply` (inside
    the forward, possibly a captured CUDA graph) adds them to the positions and zeroes them, so a step
    whose embeddings were not written (decode, dummy runs) adds zeros."""

    def __init__(self, width: int):
        super().__init__()
        self.register_buffer("offsets", torch.zeros(POSITION_CHANNELS, max(int(width), 1), dtype=torch.long),
                             persistent=False)

    def _columns(self, count: int) -> torch.Tensor:
        if count > self.offsets.shape[1]:
            if self.offsets.is_cuda and torch.cuda.is_current_stream_capturing():
                raise RuntimeError(f"medpruner: {count} tokens exceed the position buffer ({self.offsets.shape[1]})")
            self.offsets = torch.zeros(POSITION_CHANNELS, count, dtype=torch.long, device=self.offsets.device)
        return self.offsets[:, :count]

    def write(self, count: int, is_multimodal: torch.Tensor | None, offsets: torch.Tensor | None) -> None:
        """``offsets``: ``[k, 3]`` for the ``k`` True entries of ``is_multimodal`` (``[count]``)."""
        columns = self._columns(count)
        columns.zero_()
        if offsets is not None:
            # masked_scatter_ fills the True entries in row-major order (channel by channel) without the
            # host sync a boolean-index assignment costs on CUDA
            mask = is_multimodal.to(columns.device).unsqueeze(0).expand(POSITION_CHANNELS, -1)
            columns.masked_scatter_(mask, offsets.T.contiguous().to(columns.device))

    def apply(self, positions: torch.Tensor) -> torch.Tensor:
        """``positions`` (``[3, n]``, the runner's buffer: left untouched) plus the pending offsets."""
        columns = self._columns(positions.shape[-1])
        shifted = positions + columns.to(positions.dtype)
        columns.zero_()
        return shifted


class MedPrunerModelMixin:
    """Put before the upstream model class in the bases; ``adapter_class`` gives the family."""

    adapter_class: type[Adapter]

    def __init__(self, *, vllm_config, prefix: str = "model"):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.medpruner_config = serving_config(getattr(self.config, "medpruner", None))
        self.medpruner_adapter = self.adapter_class()
        depth = len(self.visual.blocks)
        layer = self.medpruner_config.importance_layer
        if not -depth <= layer < depth:
            raise ValueError(f"importance_layer must be in [-{depth}, {depth - 1}] for this tower, got {layer}")
        self.medpruner_positions = PositionOffsets(vllm_config.scheduler_config.max_num_batched_tokens)

    # ------------------------------------------------------------------------------- the tower
    def embed_multimodal(self, **kwargs):
        if kwargs.get("pixel_values_videos") is not None or kwargs.get("video_embeds") is not None:
            raise ValueError("medpruner prunes image slices; video inputs are not supported")
        if kwargs.get("image_embeds") is not None:
            raise ValueError("medpruner needs pixel_values (it scores tokens inside the tower); got image_embeds")
        counts = kwargs.get(COUNTS_KEY)
        if kwargs.get("pixel_values") is None:
            return []
        if counts is None:
            raise ValueError("medpruner: image inputs must come through the MedPruner processor (no counts)")
        counts = torch.stack(list(counts)) if isinstance(counts, (list, tuple)) else counts
        counts = counts.to(torch.long).reshape(-1, 4).cpu()
        grid = kwargs["image_grid_thw"]
        grid = torch.stack(list(grid)) if isinstance(grid, (list, tuple)) else grid
        grid_list = grid.to(torch.long).reshape(-1, 3).tolist()
        pixels = kwargs["pixel_values"]
        pixels = torch.cat(list(pixels)) if isinstance(pixels, (list, tuple)) else pixels
        return self._medpruner_embed(pixels, grid_list, counts)

    def _medpruner_embed(self, pixels: torch.Tensor, grid_list: list[list[int]], counts: torch.Tensor):
        config = self.medpruner_config
        visual = self.visual
        merge = visual.spatial_merge_size
        unit = merge * merge
        metadata = visual.prepare_encoder_metadata(grid_list)
        captured: dict = {}
        block = visual.blocks[config.importance_layer % len(visual.blocks)]
        hook = self._score_hook(unit, captured, config.backend)
        handle = block.attn.attn.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            out = visual(pixels, grid_list, encoder_metadata=metadata)
        finally:
            handle.remove()
        scores, keys = captured["scores"], captured["keys"]
        order = metadata.get("window_index")
        if order is not None:
            inverse = torch.argsort(order.to(scores.device))
            scores, keys = scores[inverse], keys[inverse]
        width = self.config.vision_config.out_hidden_size
        pooled, side = out[:, :width], out[:, width:]
        tokens = [t * h * w // unit for t, h, w in grid_list]
        device = out.device
        token_cu = to_device(host_offsets(tokens), device, torch.int32)
        budget = tuple(counts[:, j].to(device) for j in range(3))
        keep, features = self.medpruner_adapter.select_tokens(
            scores, keys, pooled, token_cu, tokens, None, config, budget=budget
        )
        kept = counts[:, 0].tolist()
        total = sum(kept)
        # the request's one host read: the kernels' deferred checks (CUDA) are raised here
        [[found]] = host_read(keep.sum(), last=True)
        if found != total:
            raise RuntimeError(f"medpruner kept {found} tokens where the budget reserved {total} placeholders")
        index = compact_indices(keep, total)
        offsets = grid_offsets(grid_list, merge, device).index_select(0, index)
        limit = int(2 / torch.finfo(out.dtype).eps)  # integers stay exact up to here
        if max(max(h, w) // merge for _, h, w in grid_list) > limit:
            raise ValueError(f"medpruner: image grids wider than {limit} tokens are not exact in {out.dtype}")
        rows = torch.cat([features.index_select(0, index), side.index_select(0, index), offsets.to(out.dtype)], 1)
        return rows.split(kept)

    @staticmethod
    def _score_hook(unit: int, captured: dict, backend: str):
        def hook(module, args, kwargs):
            q, k = kwargs["query"], kwargs["key"]
            q = q.reshape(-1, *q.shape[-2:])
            k = k.reshape(-1, *k.shape[-2:])
            cu = kwargs["cu_seqlens"].to(device=q.device, dtype=torch.int32)
            captured["scores"], captured["keys"] = block_scores(q, k, cu, q.shape[-1] ** -0.5, unit, backend)

        return hook

    # --------------------------------------------------------------------------- the language model
    def embed_input_ids(self, input_ids, multimodal_embeddings=None, *, is_multimodal=None):
        offsets = None
        if multimodal_embeddings is not None and len(multimodal_embeddings) > 0:
            offsets = torch.cat([e[:, -POSITION_CHANNELS:] for e in multimodal_embeddings]).round().long()
            multimodal_embeddings = [
                copy_mm_embedding_modality(e, e[:, :-POSITION_CHANNELS]) for e in multimodal_embeddings
            ]
        self.medpruner_positions.write(input_ids.shape[0], is_multimodal, offsets)
        return super().embed_input_ids(input_ids, multimodal_embeddings, is_multimodal=is_multimodal)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        positions = self.medpruner_positions.apply(positions)
        return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)

    def get_mrope_input_positions(self, input_tokens, mm_features):
        merge = self.config.vision_config.spatial_merge_size
        parts: list[np.ndarray] = []
        next_position = 0
        cursor = 0
        for feature in sorted(mm_features, key=lambda f: f.mm_position.offset):
            if feature.modality != "image":
                raise ValueError(f"medpruner serves image slices only, got {feature.modality}")
            t, h, w = feature.data["image_grid_thw"].data.tolist()
            kept, _, _, skipped = feature.data[COUNTS_KEY].data.tolist()
            first = feature.mm_position.offset + 1  # the placeholder starts at <|vision_start|>
            text = first - cursor
            parts.append(np.broadcast_to(np.arange(text), (3, text)) + next_position)
            next_position += text
            parts.append(np.full((3, kept), next_position))
            extent = max(t, h // merge, w // merge)
            next_position += extent
            parts.append(np.full((3, 1), next_position))  # <|vision_end|>
            next_position += 1 + skipped * (extent + 2)
            cursor = first + kept + 1
        tail = len(input_tokens) - cursor
        parts.append(np.broadcast_to(np.arange(tail), (3, tail)) + next_position)
        next_position += tail
        positions = np.concatenate(parts, axis=1).astype(np.int64)
        return torch.from_numpy(positions), int(next_position - len(input_tokens))


_Qwen3Processor = processor_class(Qwen3VLMultiModalProcessor, Qwen3VLAdapter)
_Qwen25Processor = processor_class(Qwen2_5_VLMultiModalProcessor, Qwen25VLAdapter)


@MULTIMODAL_REGISTRY.register_processor(
    _Qwen3Processor, info=Qwen3VLProcessingInfo, dummy_inputs=Qwen3VLDummyInputsBuilder
)
class MedPrunerQwen3VLForConditionalGeneration(MedPrunerModelMixin, Qwen3VLForConditionalGeneration):
    adapter_class = Qwen3VLAdapter


@MULTIMODAL_REGISTRY.register_processor(
    _Qwen25Processor, info=Qwen2_5_VLProcessingInfo, dummy_inputs=Qwen2_5_VLDummyInputsBuilder
)
class MedPrunerQwen2_5_VLForConditionalGeneration(MedPrunerModelMixin, Qwen2_5_VLForConditionalGeneration):
    adapter_class = Qwen25VLAdapter
