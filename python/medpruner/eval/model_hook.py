"""Run any selector of :mod:`medpruner.selectors` inside a Hugging Face VLM, through the shared pipeline.

:func:`selector_adapter` makes, at run time, a subclass of the model's own adapter class whose two
stages call the chosen selector instead of IAF and DINS; :func:`patch_with_selector` patches the model
with it the way ``apply_medpruner`` does. Everything after the stages (the sequence surgery, positions,
deepstack, the KV cache, ``generate``) is the pipeline's own code, so every method is fed to the model
exactly as MedPruner is.

How the stages map (fast mode, no budget in the config):

* slice stage (the pipeline's ``_iaf``): the vision tower encodes every slice (a selector may need every
  slice's scores), the selector runs once per volume on the tower's scores, keys and features, and its
  ``slice_keep`` goes back to the pipeline, which then drops the other slices with their wrapper tokens,
  as the fast mode drops IAF's;
* encode: when every slice survives, the first encoding is reused; otherwise the surviving slices are
  encoded again (the tower attends within one slice, so their features are the same) to get the
  family's side outputs (Qwen3-VL's deepstack) for exactly those slices;
* token stage (``select_tokens``): the selector's ``token_keep`` and (merged) features of the encoded
  slices.

``model.medpruner_stats`` is the pipeline's :class:`~medpruner.config.PruneStats` of the last request;
``adapter.selections`` holds the selector's :class:`~medpruner.selectors.SelectResult` per volume.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from medpruner.adapters import adapter_for, unpatch
from medpruner.adapters.base import Adapter
from medpruner.config import MedPrunerConfig
from medpruner.selectors import SelectorSpec, get_selector

__all__ = ["patch_with_selector", "selector_adapter", "selector_options"]

# The knobs a selector may accept, filled from the run's settings when its signature has them.
_SHARED_OPTIONS = ("gamma", "tau", "temperature", "merge", "context_frac", "backend")


def selector_options(spec: SelectorSpec, settings: dict[str, Any], adapter: Adapter, config: MedPrunerConfig):
    """The keyword options ``spec.select`` accepts among the shared knobs: ``settings`` values, with the
    model family's DINS temperature (as the pipeline resolves it) and the config's backend."""
    values = dict(settings)
    values["temperature"] = config.resolved_temperature(adapter.default_temperature)
    values["backend"] = config.backend
    accepted = inspect.signature(spec.select).parameters
    return {name: values[name] for name in _SHARED_OPTIONS if name in accepted and name in values}


class _SelectorStages:
    """The stage overrides; mixed in before the model's adapter class by :func:`selector_adapter`."""

    model: Any
    spec: SelectorSpec
    budgets: list | None
    options: dict[str, Any]
    seed: int

    def _iaf(self, call, layout, volume_cu, config):
        model = self.model
        layer = config.importance_layer % self.vision_depth(model)
        encoded = super().encode(model, call, layout, None, layer, config)
        pixels = call[self.pixel_key]
        volumes = volume_cu.tolist()
        budgets = self.budgets if self.budgets is not None else [None] * (len(volumes) - 1)
        if len(budgets) != len(volumes) - 1:
            raise ValueError(f"{self.spec.name}: {len(budgets)} budgets for {len(volumes) - 1} volumes")
        token_offsets, row_offsets = layout.token_offsets, layout.row_offsets
        self._layout_offsets = token_offsets
        grid = self._token_grid(model, call)
        slice_keep, token_keep, features, self.selections = [], [], [], []
        for v, (first, last) in enumerate(zip(volumes[:-1], volumes[1:], strict=True)):
            start, end = token_offsets[first], token_offsets[last]
            slice_cu = torch.tensor(token_offsets[first : last + 1], dtype=torch.int32, device=encoded.scores.device)
            slice_pixels = self.iaf_slices(pixels[row_offsets[first] : row_offsets[last]], last - first)
            extra = {}
            if grid is not None and "grid" in inspect.signature(self.spec.select).parameters:
                extra["grid"] = grid[first]
            generator = torch.Generator(device=encoded.scores.device).manual_seed(self.seed + v)
            result = self.spec.select(
                encoded.scores[start:end].float(),
                encoded.keys[start:end].float(),
                encoded.features[start:end],
                slice_cu - start,
                budgets[v],
                slice_pixels=slice_pixels,
                generator=generator,
                **self.options,
                **extra,
            )
            self.selections.append(result)
            slice_keep.append(result.slice_keep)
            token_keep.append(result.token_keep)
            features.append(encoded.features[start:end] if result.features is None else result.features)
        self._encoded = encoded
        self._token_keep = torch.cat(token_keep)
        self._features = torch.cat(features).to(encoded.features.dtype)
        self._slice_keep = torch.cat(slice_keep).to(volume_cu.device)
        return self._slice_keep

    def encode(self, model, call, layout, encoded, layer, config):
        if encoded is None:
            return self._encoded
        return super().encode(model, call, layout, encoded, layer, config)

    def select_tokens(self, scores, keys, pooled, token_cu, enc_tokens, slice_keep, config, budget=None):
        lengths = torch.tensor(
            [b - a for a, b in zip(self._layout_offsets[:-1], self._layout_offsets[1:], strict=True)],
            device=self._slice_keep.device,
        )
        of_encoded = self._slice_keep.repeat_interleave(lengths, output_size=self._token_keep.numel())
        keep, features = self._token_keep[of_encoded], self._features[of_encoded]
        # the request is done with the first encoding: do not hold the tower's outputs until the next one
        self._encoded = self._token_keep = self._features = None
        if keep.numel() != pooled.shape[0]:
            raise ValueError(
                f"{self.spec.name}: the selection covers {keep.numel()} tokens of the encoded slices, the "
                f"tower returned {pooled.shape[0]}"
            )
        return keep, features.to(pooled.dtype)

    @staticmethod
    def _token_grid(model, call) -> list[tuple[int, int]] | None:
        """(rows, cols) of LLM tokens per image for the spatial selectors, where the processor says (the
        Qwen-VL grid after the 2x2 merger); None leaves the selector's square default (Gemma3's 16x16)."""
        grid_thw = call.get("image_grid_thw")
        if grid_thw is None:
            return None
        merge = model.model.visual.spatial_merge_size
        return [(h // merge, w // merge) for _, h, w in grid_thw.tolist()]


def selector_adapter(model, method: str, *, budgets=None, settings=None, config=None, seed: int = 0) -> Adapter:
    """An adapter for ``model`` whose slice and token stages run the selector ``method``.

    budgets: per volume of a request (batch row), the token budget of a budgeted method (the count the
        adaptive MedPruner kept), None otherwise; settings: the shared knobs (gamma, tau, merge,
        context_frac) passed to selectors that accept them; config: the pipeline's MedPrunerConfig (fast
        mode; its backend, importance layer and temperature apply); seed: the random selector's seed (the
        generator of volume v is seeded with ``seed + v``).
    """
    spec = get_selector(method)
    if spec.budgeted and budgets is None:
        raise ValueError(f"method {method!r} needs budgets (the token counts the adaptive MedPruner kept)")
    config = config or MedPrunerConfig()
    if config.mode != "fast" or config.budget is not None:
        raise ValueError("selector runs use the fast mode without a config budget (the selector decides both stages)")
    base = type(adapter_for(model))
    klass = type(f"{spec.name.title().replace('_', '')}{base.__name__}", (_SelectorStages, base), {})
    adapter = klass()
    adapter.model, adapter.spec, adapter.seed = model, spec, int(seed)
    adapter.budgets = None if budgets is None else list(budgets)
    adapter.options = selector_options(spec, settings or {}, adapter, config)
    adapter.selections = []
    return adapter


def patch_with_selector(model, method: str, *, budgets=None, settings=None, config=None, seed: int = 0) -> Adapter:
    """Patch ``model`` (``forward`` and ``generate``) to prune with selector ``method``; undo with
    ``medpruner.remove_medpruner(model)``. Returns the adapter (its ``selections`` after each request)."""
    config = config or MedPrunerConfig()
    adapter = selector_adapter(model, method, budgets=budgets, settings=settings, config=config, seed=seed)
    adapter.check_config(model, config)
    unpatch(model)
    adapter.patch(model, config)
    return adapter
