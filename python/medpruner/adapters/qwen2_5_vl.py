"""Qwen2.5-VL adapter: the Qwen3-VL pipeline (see ``qwen3_vl.py``) with two differences.

* The vision tower runs most blocks on windows and reorders the merged 2x2 units into window order
  before its blocks (it restores the order after the merger). The hooked q/k are in window order, so the
  scores and keys are mapped back with the inverse of the tower's window index; the importance segments
  are those of the hooked block (whole images for the full-attention blocks, which include the last).
* No deepstack features. DINS uses temperature 1 by default.

The processor normalises with the CLIP mean/std (not 0.5/0.5), so the pixel scale is about [-1.8, 2.1]
instead of [-1, 1]: the paper's gamma means slightly less here; scale it if you need the exact
[-1, 1]-scale meaning.
"""

from __future__ import annotations

import torch

from medpruner.adapters.qwen3_vl import QwenVLAdapter


class Qwen25VLAdapter(QwenVLAdapter):
    family = "qwen2_5_vl"
    default_temperature = 1.0
    has_deepstack = False

    def window_order(self, visual, grid_thw: torch.Tensor) -> torch.Tensor:
        from transformers.vision_utils import get_vision_window_index

        window_index, _ = get_vision_window_index(
            grid_thw,
            spatial_merge_size=visual.spatial_merge_size,
            window_size=visual.window_size,
            patch_size=visual.patch_size,
            kwargs={},
        )
        return window_index
