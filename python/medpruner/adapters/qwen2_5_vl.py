"""Qwen2.5-VL: the Qwen-VL hooks (``qwen.py``) with two differences.

* The vision tower runs most blocks on windows and reorders the merged 2x2 units into window order
  before its blocks (it restores the order after the merger). The hooked q/k are in window order, so the
  scores and keys are mapped back with the inverse of the tower's window index; the importance segments
  are those of the hooked block (whole images for the full-attention blocks, which include the last).
* The processor normalises with its own mean/std: the published checkpoints' processors use the CLIP
  ones, a fine-tune may use others (0.5/0.5, say). A pixel difference is then ``0.5 / std`` times its
  size on the paper's [-1, 1] scale (about 1.86x for CLIP), so IAF scales the pixels back channel by
  channel with the std of the processor that produced them: one gamma means the same for every family
  and checkpoint. The mean cancels in IAF's slice differences. The std comes from, in order:
  ``Qwen25VLAdapter(image_std=...)`` (the vLLM plugin passes its processor's, read as vLLM reads it);
  the image processor config saved with the checkpoint the model was loaded from (``model.name_or_path``,
  local files only, read once per path; ``do_normalize: false`` means std 1); the CLIP std of the
  published processor (a model built from a config, with no folder). No deepstack; DINS uses
  temperature 1 by default.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch

from medpruner.adapters.qwen import QwenVLAdapter

# The CLIP std the published Qwen2.5-VL image processors normalise with (their preprocessor_config.json).
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CHANNELS = 3


def checked_std(image_std: Sequence[float], source: str = "image_std") -> tuple[float, ...]:
    """``image_std`` as a tuple of 3 positive finite floats; ValueError naming ``source`` otherwise."""
    values = tuple(float(v) for v in image_std)
    if len(values) != CHANNELS or not all(math.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"{source} must be {CHANNELS} positive finite numbers (one per channel), got {list(values)}")
    return values


@functools.lru_cache(maxsize=64)
def checkpoint_image_std(name_or_path: str) -> tuple[float, ...] | None:
    """The std of the image processor saved with checkpoint ``name_or_path`` (a folder, or a hub id
    already in the local cache; nothing is downloaded), None when it has none."""
    if not name_or_path:
        return None
    from transformers.image_processing_base import ImageProcessingMixin

    try:
        values, _ = ImageProcessingMixin.get_image_processor_dict(name_or_path, local_files_only=True)
    except (OSError, ValueError):
        return None
    if not values.get("do_normalize", True):
        return (1.0,) * CHANNELS
    if values.get("image_std") is None:
        return None
    return checked_std(values["image_std"], f"image_std in {name_or_path}'s image processor config")


class Qwen25VLAdapter(QwenVLAdapter):
    family = "qwen2_5_vl"
    default_temperature = 1.0
    requires_type_ids = False

    def __init__(self, image_std: Sequence[float] | None = None):
        """image_std: the std the pixels were normalised with; None reads it from each model's checkpoint
        (falling back to :data:`CLIP_STD`)."""
        self.image_std = None if image_std is None else checked_std(image_std)
        self._pixel_std = self.image_std or CLIP_STD

    def prune(self, model, config, call):
        if self.image_std is None:
            self._pixel_std = checkpoint_image_std(str(getattr(model, "name_or_path", "") or "")) or CLIP_STD
        return super().prune(model, config, call)

    def iaf_slices(self, pixels: torch.Tensor, num_images: int) -> torch.Tensor:
        # Each patch row is [channel, temporal, patch, patch], channel-major; a difference on the
        # processor's scale times std / 0.5 is the difference on the [-1, 1] scale (the mean cancels).
        scale = torch.tensor(self._pixel_std, dtype=torch.float32, device=pixels.device) / 0.5
        rows = pixels.reshape(pixels.shape[0], CHANNELS, -1) * scale.view(1, -1, 1)
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
