"""The two stages every selection method shares, its per-volume result, and the registry.

A method is two functions, registered together (``@register(..., slices=...)`` on the token stage):

* the slice stage, before the encoder: ``slices(slice_pixels, slice_cu, budget, *, generator, **options)
  -> slice_keep`` (bool ``[S]``; a method without one keeps every slice), or ``(slice_keep, change)``
  with each slice's float change to the slice it was compared with;
* the token stage, after it, over the tokens of the kept slices only (a dropped slice is never encoded
  in the fast mode): ``tokens(scores, keys, features, slice_cu, budget, *, generator, **options) ->
  (token_keep, features)``; one that takes ``slice_change`` gets the kept slices' changes.

The pipeline runs them through a :class:`~medpruner.selectors.policy.Policy`; the eval and the tests
run one volume at a time through :meth:`SelectorSpec.select`::

    select(scores, keys, features, slice_cu, budget, *, slice_pixels=None, generator=None, **options)
        -> SelectResult

    scores:       float [N], the attention each visual token receives (``attention_importance``: a
                  slice's scores sum to its token count), over the tokens of every slice, flat.
    keys:         float [N, Dk], the tokens' head-averaged keys (similarity for merging and diversity).
    features:     float [N, D] or None, the tokens' LLM-space features (after the projector/merger);
                  the merging methods return merged features, the others return them unchanged.
    slice_cu:     int32 [S+1], token offsets of the S slices (0, ..., N; a slice may have no token).
    budget:       None, or an int >= 1: visual tokens to keep for the whole volume. The budgeted methods
                  get, per sample, the count the adaptive MedPruner kept, so every method is compared at
                  the same retention; a budget above N keeps everything. ``medpruner_budget`` also takes
                  a float in (0, 1] (a fraction of the kept slices' tokens, DESIGN.md "Fixed token budget").
    slice_pixels: [S, ...] the slices' pixels on the models' [-1, 1] scale (mean = std = 0.5), for the
                  slice stage (IAF's gamma is a mean absolute difference on that scale).
    generator:    torch.Generator for the methods that draw at random (seeded by the caller per sample;
                  None means a generator seeded with 0).
    options:      each goes to the stage whose function takes it (TypeError when neither does).

``select`` reports the stages separately: ``slice_keep`` (the slice stage), ``token_keep`` over every
token of the volume (False on every token of a dropped slice). Token order never changes: filter with
``features[token_keep]``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = [
    "SELECTORS",
    "SelectResult",
    "SelectorSpec",
    "check_inputs",
    "get_selector",
    "register",
    "resolve_budget",
    "scatter_tokens",
    "slice_of_token",
    "top_k_mask",
]


@dataclass(frozen=True)
class SelectResult:
    """What a selector kept for one sample.

    slice_keep: bool ``[S]``, the slice stage's decision.
    token_keep: bool ``[N]``, the final token mask (False on every token of a dropped slice; merge
        targets included).
    features: ``[N, D]`` (merged where the method merges, else the input) or None when none were given.
    stages: JSON-ready counts of both stages (see :func:`stage_counts`).
    """

    slice_keep: torch.Tensor
    token_keep: torch.Tensor
    features: torch.Tensor | None
    stages: dict

    @property
    def kept_tokens(self) -> int:
        return int(self.stages["tokens_kept"])

    @property
    def kept_slices(self) -> list[int]:
        return self.slice_keep.nonzero().flatten().tolist()


def stage_counts(slice_keep: torch.Tensor, token_keep: torch.Tensor, slice_cu: torch.Tensor) -> dict:
    """Slices and tokens before and after each stage, and the retentions they give."""
    lengths = (slice_cu[1:] - slice_cu[:-1]).long()
    tokens_total = int(lengths.sum())
    after_slices = int(lengths[slice_keep].sum())
    kept = int(token_keep.sum())
    return {
        "slices_total": int(slice_keep.numel()),
        "slices_kept": int(slice_keep.sum()),
        "tokens_total": tokens_total,
        "tokens_after_slice_stage": after_slices,
        "tokens_kept": kept,
        "slice_stage_retention": after_slices / tokens_total if tokens_total else 1.0,
        "token_stage_retention": kept / after_slices if after_slices else 0.0,
        "retention": kept / tokens_total if tokens_total else 1.0,
    }


def finish(slice_keep, token_keep, features, slice_cu) -> SelectResult:
    return SelectResult(slice_keep, token_keep, features, stage_counts(slice_keep, token_keep, slice_cu))


SliceStage = Callable[..., torch.Tensor]
TokenStage = Callable[..., tuple[torch.Tensor, torch.Tensor | None]]


def stage_options(fn: Callable, options: dict) -> dict:
    """The entries of ``options`` that the stage function ``fn`` takes as keywords."""
    accepted = inspect.signature(fn).parameters
    return {name: value for name, value in options.items() if name in accepted}


@dataclass(frozen=True)
class SelectorSpec:
    """A registered method: ``budgeted`` ones need ``budget``; ``slice_stage``/``token_stage`` say which
    stages it acts in (a stage it does not act in keeps everything); ``tokens`` and ``slices`` (None:
    every slice stays) are its stage functions."""

    name: str
    tokens: TokenStage
    slices: SliceStage | None
    budgeted: bool
    slice_stage: bool
    token_stage: bool
    description: str

    def options(self) -> set[str]:
        """The keyword options its stages take."""
        names = set(inspect.signature(self.tokens).parameters)
        if self.slices is not None:
            names |= set(inspect.signature(self.slices).parameters)
        return names - {"scores", "keys", "features", "slice_cu", "budget", "slice_pixels", "generator", "slice_change"}

    def select_slices(self, slice_pixels, slice_cu: torch.Tensor, budget, *, generator=None, **options):
        """(bool ``[S]``, the slices the slice stage keeps; float ``[S]``, each slice's change to the
        slice it was compared with, or None when the stage gives none)."""
        if self.slices is None:
            return torch.ones(slice_cu.numel() - 1, dtype=torch.bool, device=slice_cu.device), None
        out = self.slices(slice_pixels, slice_cu, budget, generator=generator, **stage_options(self.slices, options))
        return out if isinstance(out, tuple) else (out, None)

    def select_tokens(self, scores, keys, features, slice_cu, budget, *, generator=None, **options):
        """(token_keep ``[N]``, features) over the tokens of the kept slices (``slice_cu`` theirs)."""
        return self.tokens(scores, keys, features, slice_cu, budget, generator=generator,
                           **stage_options(self.tokens, options))

    def select(self, scores, keys, features, slice_cu, budget=None, *, slice_pixels=None, generator=None,
               **options) -> SelectResult:
        """Both stages on one volume (see the module docstring)."""
        unknown = sorted(set(options) - self.options())
        if unknown:
            raise TypeError(f"{self.name}: unexpected option(s) {unknown}; it takes {sorted(self.options())}")
        check_inputs(self.name, scores, keys, features, slice_cu, slice_pixels)
        slice_keep, change = self.select_slices(slice_pixels, slice_cu, budget, generator=generator, **options)
        if change is not None:
            options = {**options, "slice_change": change[slice_keep]}
        if bool(slice_keep.all()):
            token_keep, out = self.select_tokens(scores, keys, features, slice_cu, budget, generator=generator,
                                                 **options)
            return finish(slice_keep, token_keep, out, slice_cu)
        index, sub_cu = kept_slice_tokens(slice_keep, slice_cu)
        sub_features = None if features is None else features[index]
        sub_keep, sub_out = self.select_tokens(scores[index], keys[index], sub_features, sub_cu, budget,
                                               generator=generator, **options)
        token_keep, out = scatter_tokens(index, sub_keep, sub_out, features, scores.shape[0])
        return finish(slice_keep, token_keep, out, slice_cu)


SELECTORS: dict[str, SelectorSpec] = {}


def register(name: str, *, budgeted: bool, slice_stage: bool, token_stage: bool, description: str,
             slices: SliceStage | None = None):
    """Decorator adding a method to :data:`SELECTORS` under ``name``: the decorated function is its token
    stage, ``slices`` its slice stage."""

    def add(fn: TokenStage) -> TokenStage:
        if name in SELECTORS:
            raise ValueError(f"selector {name!r} is registered twice")
        SELECTORS[name] = SelectorSpec(name, fn, slices, budgeted, slice_stage, token_stage, description)
        return fn

    return add


def get_selector(name: str) -> SelectorSpec:
    if name not in SELECTORS:
        raise ValueError(f"method must be one of {sorted(SELECTORS)}, got {name!r}")
    return SELECTORS[name]


# ------------------------------------------------------------------------------------------ checks
def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_inputs(method: str, scores, keys, features, slice_cu, slice_pixels=None) -> None:
    """TypeError/ValueError naming the argument for inputs that break the shared signature."""
    for name, tensor in (("scores", scores), ("keys", keys), ("slice_cu", slice_cu)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{method}: {name} must be a torch.Tensor, got {type(tensor).__name__}")
    if scores.ndim != 1 or not scores.is_floating_point():
        raise ValueError(f"{method}: scores must be a 1-D float tensor [N], got {scores.dtype} {tuple(scores.shape)}")
    n = scores.shape[0]
    if not bool(torch.isfinite(scores).all()):
        raise ValueError(f"{method}: scores must be finite")
    if keys.ndim != 2 or keys.shape[0] != n or not keys.is_floating_point():
        raise ValueError(f"{method}: keys must be a float tensor [N={n}, Dk], got {keys.dtype} {tuple(keys.shape)}")
    if features is not None:
        if not isinstance(features, torch.Tensor):
            raise TypeError(f"{method}: features must be a torch.Tensor or None, got {type(features).__name__}")
        if features.ndim != 2 or features.shape[0] != n or not features.is_floating_point():
            raise ValueError(
                f"{method}: features must be a float tensor [N={n}, D], got {features.dtype} {tuple(features.shape)}"
            )
    if slice_cu.dtype != torch.int32 or slice_cu.ndim != 1 or slice_cu.numel() < 2:
        raise ValueError(
            f"{method}: slice_cu must be int32 [S+1] with S >= 1, got {slice_cu.dtype} {tuple(slice_cu.shape)}"
        )
    if int(slice_cu[0]) != 0 or int(slice_cu[-1]) != n or bool((slice_cu[1:] < slice_cu[:-1]).any()):
        raise ValueError(f"{method}: slice_cu must start at 0, never decrease and end at N={n}")
    if slice_pixels is not None:
        if not isinstance(slice_pixels, torch.Tensor):
            raise TypeError(f"{method}: slice_pixels must be a torch.Tensor or None, got {type(slice_pixels).__name__}")
        if slice_pixels.ndim < 2 or slice_pixels.shape[0] != slice_cu.numel() - 1:
            raise ValueError(
                f"{method}: slice_pixels must be [S={slice_cu.numel() - 1}, ...], got {tuple(slice_pixels.shape)}"
            )


def resolve_budget(method: str, budget, total: int, *, allow_fraction: bool = False) -> int:
    """The token count a budgeted method keeps: ``budget`` clamped to ``[min(1, total), total]``."""
    if budget is None:
        raise ValueError(f"{method}: budget is required (the token count the adaptive MedPruner kept)")
    if allow_fraction and isinstance(budget, float):
        if not (0.0 < budget <= 1.0):
            raise ValueError(f"{method}: a fractional budget must be in (0, 1], got {budget}")
        return min(max(math.ceil(budget * total), min(1, total)), total)
    if not _is_int(budget) or budget < 1:
        raise ValueError(f"{method}: budget must be an int >= 1, got {budget!r}")
    return min(budget, total)


# ----------------------------------------------------------------------------------------- helpers
def slice_of_token(slice_cu: torch.Tensor) -> torch.Tensor:
    """int64 ``[N]``: the slice each token belongs to."""
    lengths = (slice_cu[1:] - slice_cu[:-1]).long()
    return torch.repeat_interleave(torch.arange(lengths.numel(), device=slice_cu.device), lengths)


def top_k_mask(values: torch.Tensor, k: int) -> torch.Tensor:
    """bool mask of the ``k`` largest ``values`` (ties: the lower index)."""
    order = torch.sort(values, descending=True, stable=True).indices
    mask = torch.zeros(values.shape[0], dtype=torch.bool, device=values.device)
    mask[order[:k]] = True
    return mask


def all_tokens(scores: torch.Tensor) -> torch.Tensor:
    return torch.ones(scores.shape[0], dtype=torch.bool, device=scores.device)


def scatter_tokens(index, sub_keep, sub_features, features, n):
    """The token stage's result on the kept slices' tokens (``index`` into the volume's ``n`` tokens)
    written back over the whole volume: False and the input features elsewhere."""
    token_keep = torch.zeros(n, dtype=torch.bool, device=sub_keep.device)
    token_keep[index] = sub_keep
    if features is None or sub_features is None:
        return token_keep, features
    out = features.clone()
    out[index] = sub_features.to(features.dtype)
    return token_keep, out


def uniform_tokens_per_slice(method: str, slice_cu: torch.Tensor, slice_keep: torch.Tensor | None = None) -> int:
    """The common token count of the (kept) slices; ValueError when they differ (one grid per volume)."""
    lengths = (slice_cu[1:] - slice_cu[:-1]).long()
    if slice_keep is not None:
        lengths = lengths[slice_keep]
    if lengths.numel() == 0:
        return 0
    if bool((lengths != lengths[0]).any()):
        raise ValueError(f"{method}: every slice must have the same token count (slice_cu), got {lengths.tolist()}")
    return int(lengths[0])


def kept_slice_tokens(slice_keep: torch.Tensor, slice_cu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens of the kept slices, compacted: (int64 index ``[M]`` into the flat tokens, int32 ``[k+1]``
    offsets of the kept slices within them)."""
    lengths = (slice_cu[1:] - slice_cu[:-1]).long()
    index = slice_keep[slice_of_token(slice_cu)].nonzero().flatten()
    sub_cu = torch.zeros(int(slice_keep.sum()) + 1, dtype=torch.int32, device=slice_cu.device)
    sub_cu[1:] = torch.cumsum(lengths[slice_keep], 0).to(torch.int32)
    return index, sub_cu
