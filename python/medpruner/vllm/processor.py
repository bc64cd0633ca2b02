"""The multimodal processors: the upstream Qwen-VL processors plus IAF and the fixed budget.

For each request (one volume) the processor runs the upstream image processing, then IAF on the
slices (``Adapter._iaf``, the HF path's code) and the budget split (``Adapter._budget_counts``). Each
image item gets ``medpruner_counts = [kept tokens, DINS picks, merge targets, dropped slices after it]``;
a kept slice's ``<|vision_start|><|image_pad|><|vision_end|>`` becomes its budgeted number of
placeholders, a dropped slice loses the whole wrapper and its item leaves the request.

Pixel scale. vLLM may leave normalisation to the tower (``mm_device_do_normalize``, on by default for
Qwen-VL): the processor then returns raw ``uint8`` patches and the tower's first module rescales and
normalises them. IAF's gamma is defined on the normalised pixels the HF processor returns, so the raw
patches get the same affine map the tower applies (fp32, the processor config's mean/std/rescale)
before IAF; on raw bytes a near-duplicate slice is ~255/2 times farther from its anchor. An adapter that
rescales by the processor's std (Qwen2.5-VL) gets the checkpoint's, resolved from the same config, so a
checkpoint normalised with mean = std = 0.5 keeps the slices a CLIP-normalised one keeps.

Caching. The counts depend on the whole volume, so each image's hash (the processor and encoder cache
key) covers the hashes of all the request's images and the image's index, on top of the request's
``mm_processor_kwargs`` (gamma, budget) that vLLM already folds in. When any image of a request misses
the cache, the whole request is processed again: IAF needs every slice's pixels.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from functools import cached_property
from typing import Any

import torch

from medpruner.adapters.base import Adapter, SliceLayout
from medpruner.config import change_counts
from medpruner.vllm._compat import (
    MultiModalFieldConfig,
    MultiModalHasher,
    MultiModalKwargsItems,
    PromptReplacement,
    PromptUpdateDetails,
    load_norm_params,
    mm_input,
)
from medpruner.vllm.engine import REQUEST_KNOBS, request_config, serving_config

COUNTS_KEY = "medpruner_counts"


def slice_counts(adapter: Adapter, pixel_values: torch.Tensor, grid_thw: torch.Tensor, merge_size: int,
                 config) -> torch.Tensor:
    """``[n, 4]`` long per image of one volume: tokens kept (0 for a dropped slice), DINS picks, merge
    targets, and the number of dropped slices that follow it up to the next kept one.

    IAF runs through the adapter (its family's pixel scale; a size change raises ValueError), the
    counts through ``Adapter._budget_counts``: the code of the HF budget mode."""
    grid = grid_thw.to(torch.long)
    n = grid.shape[0]
    rows = grid.prod(-1)
    tokens = rows // (merge_size * merge_size)
    layout = SliceLayout(tokens=tokens.tolist(), rows=rows.tolist(), source="image_grid_thw",
                         token_pixels=merge_size * merge_size * pixel_values.shape[1])
    volume_cu = torch.tensor([0, n], dtype=torch.int32)
    keep, change = adapter._iaf({adapter.pixel_key: pixel_values.float()}, layout, volume_cu, config)
    if config.budget is not None and config.allocation == "change":
        counts = change_counts(config.budget, keep.tolist(), change.tolist(), [n], tokens.tolist(),
                               merge=config.merge, context_frac=config.context_frac)
        share, picks, targets = (torch.tensor(c, dtype=torch.long) for c in counts)
    else:
        share, picks, targets = adapter._budget_counts(
            keep, volume_cu, torch.zeros(n, dtype=torch.long), tokens, config
        )
    keep_list = keep.tolist()
    if not keep_list[0]:
        raise RuntimeError("IAF dropped the first slice of a volume; it always keeps its anchor")
    skips = [0] * n
    last = 0
    for i, kept in enumerate(keep_list):
        if kept:
            last = i
        else:
            skips[last] += 1
    zero = torch.zeros_like(share)
    return torch.stack(
        [
            torch.where(keep, share, zero),
            torch.where(keep, picks, zero),
            torch.where(keep, targets, zero),
            torch.tensor(skips, dtype=torch.long),
        ],
        dim=1,
    )


class MedPrunerProcessorMixin:
    """Put before the upstream processor class in the bases; ``adapter_class`` gives the family."""

    adapter_class: type[Adapter]

    # ---------------------------------------------------------------------------------- settings
    def _medpruner_engine_config(self):
        return serving_config(getattr(self.info.get_hf_config(), "medpruner", None))

    def _medpruner_request_config(self, hf_kwargs: Mapping[str, object]):
        merged = self.info.ctx.get_merged_mm_kwargs(hf_kwargs)
        return request_config(self._medpruner_engine_config(), {k: merged[k] for k in REQUEST_KNOBS if k in merged})

    @cached_property
    def _medpruner_norm_params(self):
        """The checkpoint's (image_mean, image_std, rescale_factor), resolved from its processor config
        as the tower's input normalisation resolves them; read once (vLLM reads the processor config
        files on each call)."""
        return load_norm_params(self.info.ctx.model_config)

    @cached_property
    def _medpruner_norm(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Per channel (scale, shift) of the tower's input normalisation, None when the processor
        normalises itself."""
        if not self.info.ctx.get_mm_config().mm_device_do_normalize:
            return None
        params = self._medpruner_norm_params
        std = torch.tensor(params.image_std, dtype=torch.float32)
        return params.rescale_factor / std, -torch.tensor(params.image_mean, dtype=torch.float32) / std

    def _medpruner_adapter(self) -> Adapter:
        """The family's adapter; one whose IAF rescales by the processor's std (Qwen2.5-VL) gets the
        checkpoint's, so gamma stays on the paper's scale whatever the checkpoint normalises with."""
        if "image_std" in inspect.signature(self.adapter_class).parameters:
            return self.adapter_class(image_std=self._medpruner_norm_params.image_std)
        return self.adapter_class()

    def _medpruner_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``pixel_values`` on the scale the HF processor returns (what the tower normalises to)."""
        if self._medpruner_norm is None:
            return pixel_values.float()
        scale, shift = self._medpruner_norm
        rows = pixel_values.reshape(pixel_values.shape[0], scale.numel(), -1)
        return (rows * scale.view(1, -1, 1) + shift.view(1, -1, 1)).reshape(pixel_values.shape)

    # ------------------------------------------------------------------------------ HF processing
    def _apply_hf_processor_main(self, mm_items, hf_kwargs):
        config = self._medpruner_request_config(hf_kwargs)
        upstream = {k: v for k, v in hf_kwargs.items() if k not in REQUEST_KNOBS}
        data = super()._apply_hf_processor_main(mm_items, upstream)
        grid = data.get("image_grid_thw")
        if grid is not None and len(grid) > 0:
            merge = self.info.get_hf_config().vision_config.spatial_merge_size
            pixels = self._medpruner_pixels(data["pixel_values"])
            data[COUNTS_KEY] = slice_counts(self._medpruner_adapter(), pixels, grid, merge, config)
        return data

    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs):
        fields = dict(super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs))
        # CPU metadata, as image_grid_thw: M-RoPE positions need it even when prefix caching strips a
        # request's covered images to their keep_on_cpu fields (another question about the same volume),
        # and the tower reads it on the host anyway.
        fields[COUNTS_KEY] = MultiModalFieldConfig.batched("image", keep_on_cpu=True)
        return fields

    # ------------------------------------------------------------------------------------ caching
    def _get_mm_hashes(self, inputs):
        hashes = dict(super()._get_mm_hashes(inputs))
        images = hashes.get("image")
        if images:
            algorithm = self.info.ctx.get_mm_config().mm_hasher_algorithm
            volume = "|".join(images)
            hashes["image"] = [
                MultiModalHasher.hash_kwargs(algorithm, medpruner_volume=volume, medpruner_slice=i, mm_hash=h)
                for i, h in enumerate(images)
            ]
        return hashes

    def _get_cache_missing_items(self, cache, mm_data_items, mm_hashes):
        is_cached, missing = super()._get_cache_missing_items(cache, mm_data_items, mm_hashes)
        flags = is_cached.get("image")
        if not flags or all(flags) or not any(flags):
            return is_cached, missing
        is_cached = {**is_cached, "image": [False] * len(flags)}
        data = {m: [mm_data_items[m][i] for i, hit in enumerate(hits) if not hit] for m, hits in is_cached.items()}
        return is_cached, self.info.parse_mm_data({m: v for m, v in data.items() if v}, validate=False)

    # ------------------------------------------------------------------------------ prompt update
    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        upstream = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        cfg = self.info.get_hf_config()
        start, pad, end = cfg.vision_start_token_id, cfg.image_token_id, cfg.vision_end_token_id

        def replacement(item_idx: int):
            kept = int(out_mm_kwargs["image"][item_idx][COUNTS_KEY].data[0])
            if kept == 0:
                return []
            return PromptUpdateDetails.select_token_id([start] + [pad] * kept + [end], pad)

        return [
            PromptReplacement(modality="image", target=[start, pad, end], replacement=replacement),
            *[update for update in upstream if update.modality != "image"],
        ]

    def apply(self, inputs, timing_ctx):
        result = self._cached_apply_hf_processor(inputs, timing_ctx)
        counts = inputs.mm_data_items.get_all_counts()
        self._validate_mm_kwargs(result.kwargs, counts)
        self._validate_mm_updates(result.prompt_updates, counts)
        self._check_volume_layout(result.prompt_ids, counts.get("image", 0))
        prompt_ids, placeholders = self._apply_prompt_updates(result.prompt_ids, result.prompt_updates)
        kept = [p.item_idx for p in placeholders.get("image", [])]
        expected = {m: n for m, n in counts.items() if m != "image"}
        if "image" in counts:
            expected["image"] = len(kept)
        self._validate_mm_placeholders(placeholders, expected)
        kwargs: dict[str, Any] = dict(result.kwargs)
        hashes = dict(result.hashes)
        if "image" in counts:
            kwargs["image"] = [result.kwargs["image"][i] for i in kept]
            hashes["image"] = [result.hashes["image"][i] for i in kept]
        return mm_input(
            prompt_token_ids=prompt_ids,
            mm_kwargs=MultiModalKwargsItems(kwargs),
            mm_hashes=hashes,
            mm_placeholders={m: [p.to_range() for p in ps] for m, ps in placeholders.items()},
        )

    def _check_volume_layout(self, prompt_ids: list[int], num_images: int) -> None:
        """One volume per request: its slices must be consecutive wrapped placeholders, so that a
        dropped slice's place in the M-RoPE positions is known from the kept slice before it."""
        if num_images < 2:
            return
        cfg = self.info.get_hf_config()
        block = [cfg.vision_start_token_id, cfg.image_token_id, cfg.vision_end_token_id]
        starts = [i for i in range(len(prompt_ids) - 2) if prompt_ids[i : i + 3] == block]
        if len(starts) != num_images or any(b - a != 3 for a, b in zip(starts, starts[1:], strict=False)):
            raise ValueError(
                "medpruner: a request is one volume whose slices are consecutive "
                "<|vision_start|><|image_pad|><|vision_end|> blocks (no text between slices); found "
                f"{len(starts)} such blocks for {num_images} images"
            )


def processor_class(upstream: type, adapter: type[Adapter]) -> type:
    """The MedPruner processor over ``upstream`` for ``adapter``'s family."""
    return type(f"MedPruner{upstream.__name__}", (MedPrunerProcessorMixin, upstream), {"adapter_class": adapter})
