"""Qwen2.5-VL: the Qwen-VL hooks (``qwen.py``) with two differences.

* The vision tower runs most blocks on windows and reorders the merged 2x2 units into window order
  before its blocks (it restores the order after the merger). The hooked q/k are in window order, so the
  scores and keys are mapped back with the inverse of the tower's window index; the importance segments
  are those of the hooked block (whole images for the full-attention blocks, which include the last).
* The processor normalises with the CLIP mean/std, not 0.5/0.5, so a pixel difference is ``0.5 / std``
  (about 1.86x) larger than on the paper's [-1, 1] scale. IAF compares the pixels scaled back to that
  scale channel by channel, so one gamma means the same for every family. No deepstack; DINS uses
  temperature 1 by default.
"""

from __future__ import annotations

import torch

from medpruner.adapters.qwen import QwenVLAdapter

# The CLIP std Qwen2.5-VL's image processor normalises with (its preprocessor_config.json).
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class Qwen25VLAdapter(QwenVLAdapter):
    family = "qwen2_5_vl"
    default_temperature = 1.0
    requires_type_ids = False

    def iaf_slices(self, pixels: torch.Tensor, num_images: int) -> torch.Tensor:
        # Each patch row is [channel, temporal, patch, patch], channel-major; a difference on the
        # CLIP scale times std / 0.5 is the difference on the [-1, 1] scale (the mean cancels).
        scale = torch.tensor(CLIP_STD, dtype=torch.float32, device=pixels.device) / 0.5
        rows = pixels.reshape(pixels.shape[0], len(CLIP_STD), -1) * scale.view(1, -1, 1)
        return rows.reshape(num_images, -1)

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
