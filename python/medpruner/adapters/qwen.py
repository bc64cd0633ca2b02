"""The Qwen-VL hooks Qwen3-VL and Qwen2.5-VL share (the pipeline itself is ``base.Adapter.prune``).

A volume is a sequence of images, one per slice: ``<|vision_start|><|image_pad|>*n<|vision_end|>``. The
processor packs each slice as ``t*h*w`` flattened patches; the vision tower's merger turns every 2x2
block of patches (4 consecutive rows of ``pixel_values``) into one LLM token, so the token importance is
the attention-received score of the patches averaged over groups of 4. Positions: each kept token keeps
the M-RoPE (t, h, w) it had in the full grid (``get_rope_index`` on the unpruned inputs, run before any
pruning work so its own host reads wait on nothing of ours), and decoding continues after the unpruned
sequence's last position.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager

import torch

from medpruner.adapters.base import TOWER_OUTPUT_FLAGS, Adapter, Encoded, SliceLayout
from medpruner.adapters.sequences import block_scores, caller_positions, range_index, to_device
from medpruner_kernels._validation import raise_pending_errors


class QwenVLAdapter(Adapter):
    """M-RoPE, the grouped 2x2 merger, one image per slice."""

    has_deepstack = False
    consumed_keys = ("pixel_values", "image_grid_thw")
    # Qwen3-VL's model refuses images without mm_token_type_ids; Qwen2.5-VL then numbers every token
    # 1-D (no M-RoPE grid), and so does the pruned call.
    requires_type_ids = True

    def vision_depth(self, model) -> int:
        return len(model.model.visual.blocks)

    def window_order(self, visual, grid_thw: torch.Tensor) -> torch.Tensor | None:
        """Permutation of merged tokens the tower applies before its blocks (None: identity)."""
        return None

    def unprunable(self, call) -> str | None:
        if call.get("pixel_values_videos") is not None:
            return "video inputs (pixel_values_videos): medpruner prunes image slices"
        return super().unprunable(call)

    def check_call(self, call) -> None:
        if call.get("image_grid_thw") is None:
            raise ValueError("image_grid_thw is required with pixel_values")
        if self.requires_type_ids and call.get("mm_token_type_ids") is None:
            raise ValueError("mm_token_type_ids is required (the processor returns it with input_ids)")

    def layout(self, model, call) -> SliceLayout:
        # The grid is image metadata the tower itself reads to the host (as Python ints) to build its
        # positions; the processor returns it on the CPU.
        grids = call["image_grid_thw"].tolist()
        unit = model.model.visual.spatial_merge_size**2
        rows = [t * h * w for t, h, w in grids]
        if call["pixel_values"].shape[0] != sum(rows):
            raise ValueError(
                f"pixel_values has {call['pixel_values'].shape[0]} patch rows but image_grid_thw describes "
                f"{sum(rows)} ({len(rows)} images)"
            )
        # The processor orders patch rows merge window by merge window: one LLM token's pixels are
        # ``unit`` consecutive rows.
        return SliceLayout(tokens=[r // unit for r in rows], rows=rows, source="image_grid_thw",
                           token_pixels=unit * call["pixel_values"].shape[1])

    def encode(self, model, call, layout, encoded, layer, config) -> Encoded:
        visual = model.model.visual
        pixels, grid = call["pixel_values"], call["image_grid_thw"]
        if encoded is not None:
            ranges = [(layout.row_offsets[i], layout.row_offsets[i + 1]) for i in encoded]
            pixels = pixels.index_select(0, range_index(ranges, pixels.device))
            grid = grid[to_device(encoded, grid.device)]
        captured: dict = {}
        # the outputs the caller asked of the model (vision hidden states, attentions) come back as
        # the unpatched model's image outputs would
        requested = {k: call[k] for k in TOWER_OUTPUT_FLAGS if call.get(k) is not None}
        with self._capture(visual, layer, visual.spatial_merge_size**2, config, captured):
            out = visual(pixels.type(visual.dtype), grid_thw=grid, return_dict=True, **requested)
        scores, keys = captured["scores"], captured["keys"]
        order = self.window_order(visual, grid)
        if order is not None:
            inverse = torch.argsort(order.to(scores.device))
            scores, keys = scores[inverse], keys[inverse]
        side = list(out.deepstack_features) if self.has_deepstack else []
        return Encoded(out, out.pooler_output, scores, keys, side)

    def token_grid(self, model, call) -> list[tuple[int, int]] | None:
        """The Qwen-VL grid of each image after the 2x2 merger."""
        grid_thw = call.get("image_grid_thw")
        if grid_thw is None:
            return None
        merge = model.model.visual.spatial_merge_size
        return [(h // merge, w // merge) for _, h, w in grid_thw.tolist()]

    def package(self, encoded: Encoded, index: torch.Tensor):
        """The tower's own output (hidden states, attentions) with the kept features as its pooler
        output (one tensor; the pipeline splits it per image)."""
        fields = dict(encoded.output.items())
        fields["pooler_output"] = (encoded.features.index_select(0, index),)
        if self.has_deepstack:
            fields["deepstack_features"] = [(s.index_select(0, index),) for s in encoded.side]
        return type(encoded.output)(**fields)

    def position_inputs(self, model, call, attention_mask):
        """The positions to repack and the rope deltas of the unpruned request: the caller's
        ``position_ids`` when given (the model uses them as they are), else the model's own numbering."""
        input_ids = call["input_ids"]
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        given = caller_positions(call)
        if given is not None:
            # the delta get_rope_index would give for these positions: the next position after the
            # row's last (largest M-RoPE coordinate + 1) minus the row's valid tokens
            rope = given if given.dim() == 2 else given[-3:]
            valid = mask.bool().expand_as(rope)
            last = torch.where(valid, rope, torch.zeros_like(rope)).reshape(-1, *rope.shape[-2:]).amax(dim=(0, 2))
            deltas = (last + 1 - mask.long().sum(-1)).view(-1, 1)
            return {"position_ids": (given, 0)}, (deltas, True)
        if call.get("mm_token_type_ids") is None:
            # the model's own numbering without type ids: 1-D over the valid tokens, no delta
            text = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
            deltas = torch.zeros(input_ids.shape[0], 1, dtype=torch.long, device=input_ids.device)
            return {"position_ids": (text.unsqueeze(0).expand(3, -1, -1), 0)}, (deltas, False)
        try:
            position_ids, rope_deltas = model.model.get_rope_index(
                input_ids,
                mm_token_type_ids=call["mm_token_type_ids"],
                image_grid_thw=call["image_grid_thw"],
                attention_mask=attention_mask,
            )
        except StopIteration as error:
            # fewer images than placeholder runs; the count check (deferred on CUDA) names it
            raise_pending_errors()
            raise ValueError(self.layout(model, call).mismatch_message()) from error
        return {"position_ids": (position_ids.to(input_ids.device), 0)}, (rope_deltas, False)

    def finish_positions(self, model, pruned, repacked, new_mask, removed, state) -> None:
        rope_deltas, given = state
        if given:
            pruned["position_ids"] = repacked["position_ids"]
        else:
            text_positions = (new_mask.cumsum(-1) - 1).masked_fill(new_mask == 0, 0)
            pruned["position_ids"] = torch.cat([text_positions.unsqueeze(0), repacked["position_ids"]], dim=0)
        batch = new_mask.shape[0]
        # The pruned rows are shorter than the unpruned ones: the delta grows by the tokens removed.
        model.model.rope_deltas = rope_deltas.to(new_mask.device).view(batch, 1) + removed.view(batch, 1)

    def continuation_state(self, model):
        return model.model.rope_deltas

    def restore_continuation(self, model, state, repeats: int) -> None:
        # The model keeps one rope_deltas for its last request; a cache continued later needs the
        # deltas of the pruned prompt it holds (decoding positions = text position + delta).
        model.model.rope_deltas = state.repeat_interleave(repeats, dim=0)

    @contextmanager
    def _capture(self, visual, layer: int, unit: int, config, captured: dict):
        """Score the tokens at block ``layer`` from its post-RoPE q/k while the block runs its own
        attention: a pre-hook takes the rotary tables and segment offsets, a hook on the qkv projection
        takes q/k as they are produced, so nothing of size N x N and no extra projection is computed."""
        attn = visual.blocks[layer].attn
        rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb_vision
        state: dict = {}

        def take_inputs(module, args, kwargs):
            state["rope"] = kwargs["position_embeddings"]
            state["cu"] = kwargs["cu_seqlens"]

        def take_qkv(module, args, output):
            # The selection takes no gradient: nothing here joins the autograd graph, so a
            # checkpointed block saves the same tensors when it is recomputed without this hook.
            with torch.no_grad():
                score(output.detach())

        def score(output):
            n = output.shape[0]
            q, k, _ = output.reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
            q, k = rope(q, k, *state["rope"])
            captured["scores"], captured["keys"] = block_scores(
                q, k, state["cu"].to(torch.int32), attn.scaling, unit, config.backend
            )

        handles = [
            attn.register_forward_pre_hook(take_inputs, with_kwargs=True),
            attn.qkv.register_forward_hook(take_qkv),
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
