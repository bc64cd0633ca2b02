"""The MedPruner knobs (:class:`MedPrunerConfig`), what a pruned request kept (:class:`PruneStats`), the
model-family vocabulary and the fixed-budget split.

A leaf module: it imports nothing of the ``medpruner`` package, so the adapters, the CLI, the vLLM
plugin and the eval can all depend on it without cycles.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from medpruner_kernels._dispatch import BACKENDS
from medpruner_kernels._validation import check_tau

MODES = ("fast", "paper")
IAF_RULES = ("mean", "local")
ALLOCATIONS = ("even", "change")

# One name per model family, used by volume_to_inputs, the adapters, the CLI and the eval. A Gemma3
# checkpoint is named by the medical model built on it; "gemma3" is accepted as an alias.
FAMILIES = ("qwen3_vl", "qwen2_5_vl", "medgemma")
FAMILY_ALIASES = {"gemma3": "medgemma"}


def canonical_family(name: str) -> str:
    """The :data:`FAMILIES` name of ``name`` (aliases resolved); ValueError naming ``family`` otherwise."""
    family = FAMILY_ALIASES.get(name, name) if isinstance(name, str) else name
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES} (or an alias in {sorted(FAMILY_ALIASES)}), got {name!r}")
    return family


@dataclass
class MedPrunerConfig:
    """The MedPruner knobs (paper-faithful defaults; see DESIGN.md "Paper-faithful defaults").

    gamma: IAF threshold on the mean absolute difference between a slice and its anchor, on the
        paper's [-1, 1] pixel scale (mean = std = 0.5); families whose processor normalises otherwise
        (Qwen2.5-VL: the CLIP mean/std) are brought to that scale first, so one gamma means the same
        for every family. A negative gamma keeps every slice.
    tau: DINS nucleus mass kept per slice, > 0; tau >= 1 keeps every token (the rule of nucleus_select).
    merge: merge the pruned tokens into contextual tokens (VisionZip-style) instead of dropping them.
    mode: "fast" runs IAF on the pixels before the vision tower (dropped slices are never encoded);
        "paper" encodes every slice and keeps the first token of each dropped slice, as the paper's code.
    budget: None (the paper's adaptive DINS) | a float in (0, 1] (a fraction of the kept slices'
        visual tokens) | an int >= 1 (visual tokens per volume); see :func:`budget_split`. Replaces
        tau: every kept slice keeps exactly its share.
    temperature: softmax temperature of the DINS masses; None takes the family default (2 for Qwen3-VL
        and Gemma3/MedGemma, 1 otherwise).
    importance_layer: index of the vision-tower block whose attention gives the token importance
        (negative counts from the end; -1 is the last block, the paper's choice).
    context_frac: contextual tokens per slice, as a fraction of its tokens (at least one).
    min_keep: tokens every kept slice keeps at least (>= 1: a kept slice never loses all its tokens).
    backend: kernel backend, "auto" | "triton" | "cpp" | "torch".
    record_tokens: keep CPU copies of the token scores and the final keep mask in the stats (for
        heatmaps and debugging); costs one device-to-host copy per request, so off by default.
    iaf: "mean" (the paper: a slice's mean change against gamma) | "local" (the largest mean change of
        any block against ``gamma_local``: a change confined to one merged patch, such as a small
        lesion, counts in full; :func:`medpruner_kernels.iaf_local_select`).
    gamma_local: the local rule's threshold, on the same [-1, 1] scale as gamma.
    iaf_block: pixel values per block of the local rule; None takes the family's merged patch (the
        pixels of one LLM token).
    allocation: how a fixed budget is split across the kept slices: "even" (DESIGN.md) | "change" (in
        proportion to each slice's change to its anchor, the first slice weighing as the volume's
        largest change; :func:`change_split`). The change is known before the encoder, so an engine can
        still reserve placeholders. Needs ``budget``.
    """

    gamma: float = 0.05
    tau: float = 0.9
    merge: bool = True
    mode: str = "fast"
    temperature: float | None = None
    importance_layer: int = -1
    context_frac: float = 0.05
    min_keep: int = 1
    backend: str = "auto"
    record_tokens: bool = False
    budget: float | int | None = None
    iaf: str = "mean"
    gamma_local: float = 0.1
    iaf_block: int | None = None
    allocation: str = "even"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError (TypeError for a wrong type) naming the first bad field."""
        _check_real("gamma", self.gamma)
        if not math.isfinite(float(self.gamma)):
            raise ValueError(f"MedPrunerConfig.gamma must be finite, got {self.gamma!r}")
        _check_real("tau", self.tau)
        check_tau("MedPrunerConfig", self.tau)
        if not isinstance(self.merge, bool):
            raise TypeError(f"MedPrunerConfig.merge must be a bool, got {type(self.merge).__name__}")
        if not isinstance(self.record_tokens, bool):
            raise TypeError(f"MedPrunerConfig.record_tokens must be a bool, got {type(self.record_tokens).__name__}")
        if self.mode not in MODES:
            raise ValueError(f"MedPrunerConfig.mode must be one of {MODES}, got {self.mode!r}")
        if self.temperature is not None:
            _check_real("temperature", self.temperature)
            if not (math.isfinite(float(self.temperature)) and float(self.temperature) > 0):
                raise ValueError(f"MedPrunerConfig.temperature must be > 0 or None, got {self.temperature!r}")
        if isinstance(self.importance_layer, bool) or not isinstance(self.importance_layer, int):
            raise TypeError(
                f"MedPrunerConfig.importance_layer must be an int, got {type(self.importance_layer).__name__}"
            )
        _check_real("context_frac", self.context_frac)
        if not 0.0 <= float(self.context_frac) <= 1.0:
            raise ValueError(f"MedPrunerConfig.context_frac must be in [0, 1], got {self.context_frac!r}")
        if isinstance(self.min_keep, bool) or not isinstance(self.min_keep, int):
            raise TypeError(f"MedPrunerConfig.min_keep must be an int, got {type(self.min_keep).__name__}")
        if self.min_keep < 1:
            raise ValueError(f"MedPrunerConfig.min_keep must be >= 1, got {self.min_keep}")
        if self.backend not in BACKENDS:
            raise ValueError(f"MedPrunerConfig.backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.budget is not None:
            _check_real("budget", self.budget)
            if isinstance(self.budget, int):
                if self.budget < 1:
                    raise ValueError(f"MedPrunerConfig.budget as an int must be >= 1 tokens, got {self.budget}")
            elif not 0.0 < self.budget <= 1.0:
                raise ValueError(f"MedPrunerConfig.budget as a float must be in (0, 1], got {self.budget!r}")
        if self.iaf not in IAF_RULES:
            raise ValueError(f"MedPrunerConfig.iaf must be one of {IAF_RULES}, got {self.iaf!r}")
        _check_real("gamma_local", self.gamma_local)
        if not math.isfinite(float(self.gamma_local)):
            raise ValueError(f"MedPrunerConfig.gamma_local must be finite, got {self.gamma_local!r}")
        if self.iaf_block is not None:
            if isinstance(self.iaf_block, bool) or not isinstance(self.iaf_block, int):
                raise TypeError(
                    f"MedPrunerConfig.iaf_block must be an int or None, got {type(self.iaf_block).__name__}"
                )
            if self.iaf_block < 1:
                raise ValueError(f"MedPrunerConfig.iaf_block must be >= 1, got {self.iaf_block}")
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"MedPrunerConfig.allocation must be one of {ALLOCATIONS}, got {self.allocation!r}")
        if self.mode == "paper" and (self.iaf != "mean" or self.allocation != "even"):
            raise ValueError("MedPrunerConfig: mode='paper' is the published method, unchanged: it takes "
                             "iaf='mean' and allocation='even'")
        if self.allocation == "change" and self.budget is None:
            raise ValueError("MedPrunerConfig.allocation='change' splits a fixed budget: set budget too (the "
                             "adaptive DINS has no split)")

    def resolved_temperature(self, family_default: float) -> float:
        return float(family_default if self.temperature is None else self.temperature)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, **json_kwargs) -> str:
        return json.dumps(self.to_dict(), **json_kwargs)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> MedPrunerConfig:
        if not isinstance(values, dict):
            raise TypeError(f"MedPrunerConfig.from_dict expects a dict, got {type(values).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"MedPrunerConfig: unknown field(s) {unknown}; known fields are {sorted(known)}")
        return cls(**values)

    @classmethod
    def from_json(cls, text: str) -> MedPrunerConfig:
        return cls.from_dict(json.loads(text))


def _check_real(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"MedPrunerConfig.{name} must be a real number, got {type(value).__name__}")


def budget_split(budget: float | int, kept_slices: int, tokens_per_slice: int) -> list[int]:
    """Tokens of each kept slice of a volume under a fixed budget (DESIGN.md "Fixed token budget").

    With k kept slices of n tokens: ``B = clamp(ceil(budget * (k * n)), k, k * n)`` for a float budget
    (an int budget is clamped the same way); slice i of the kept ones, in slice order, gets ``B // k``,
    plus one for the first ``B % k``. :func:`budget_counts` is the same rule on the device.
    """
    k, n = int(kept_slices), int(tokens_per_slice)
    total = math.ceil(budget * (k * n)) if isinstance(budget, float) else int(budget)
    total = min(max(total, k), k * n)
    return [total // k + (1 if i < total % k else 0) for i in range(k)]


def change_split(budget: float | int, changes, tokens_per_slice: int) -> list[int]:
    """Tokens of each kept slice of a volume under a fixed budget, in proportion to its change.

    ``changes``: per kept slice, in slice order, its IAF distance to its anchor (>= 0; the volume's
    first slice, compared with nothing, weighs as the largest change); the split is
    :func:`proportional_split`'s. Without any change (all zero) this is :func:`budget_split`.
    """
    weights = [float(c) for c in changes]
    if any(not math.isfinite(w) or w < 0 for w in weights):
        raise ValueError(f"change_split: changes must be finite and >= 0, got {weights}")
    if len(weights) > 1:
        weights[0] = max(weights[1:])
    return proportional_split(budget, weights, tokens_per_slice)


def proportional_split(budget: float | int, weights, tokens_per_slice: int) -> list[int]:
    """Tokens of each of the k kept slices of a volume under a fixed budget, in proportion to
    ``weights`` (finite, >= 0). The total ``B`` is :func:`budget_split`'s; every slice keeps at least 1
    and at most ``tokens_per_slice`` (n) tokens. The ``B - k`` tokens above the minimum are
    water-filled: each slice's share is ``level * weight``, capped at ``n - 1``, with one level for the
    volume; the integer shares take the floors and give the remaining tokens one each by the largest
    fractional part (ties: lower slice). All weights zero: :func:`budget_split`."""
    weights = [float(w) for w in weights]
    k, n = len(weights), int(tokens_per_slice)
    if any(not math.isfinite(w) or w < 0 for w in weights):
        raise ValueError(f"proportional_split: weights must be finite and >= 0, got {weights}")
    if k == 0:
        return []
    even = budget_split(budget, k, n)
    extra = sum(even) - k
    if extra == 0 or sum(weights) == 0:
        return even
    ideal = [0.0] * k
    active = [i for i in range(k) if weights[i] > 0]
    left = float(extra)
    while active:
        level = left / sum(weights[i] for i in active)
        capped = [i for i in active if level * weights[i] >= n - 1]
        if not capped:
            for i in active:
                ideal[i] = level * weights[i]
            break
        for i in capped:
            ideal[i] = float(n - 1)
            left -= n - 1
        active = [i for i in active if i not in capped]
    above = [min(math.floor(x), n - 1) for x in ideal]
    remainder = extra - sum(above)
    order = sorted((i for i in range(k) if above[i] < n - 1), key=lambda i: (-(ideal[i] - above[i]), i))
    # More tokens than the fractional parts place (all weights capped or zero): one each in slice order,
    # round after round, among the slices with room.
    while remainder > 0:
        for i in order:
            if remainder == 0:
                break
            if above[i] < n - 1:
                above[i] += 1
                remainder -= 1
        order = [i for i in range(k) if above[i] < n - 1]
    return [1 + a for a in above]


def change_counts(budget: float | int, keep: list, change: list, images_per_volume: list[int], tokens: list[int],
                  *, merge: bool, context_frac: float) -> tuple[list[int], list[int], list[int]]:
    """The host counts of ``allocation="change"``, in :func:`budget_counts`' form: per image (tokens
    kept, of which DINS picks, contextual targets), a kept slice's share from :func:`change_split` over
    its volume's kept slices, a dropped slice (all its tokens, all of them, 0). ``keep``, ``change``,
    ``tokens``: per image, volumes in order; ``images_per_volume``: images of each volume."""
    share, picks, targets = [], [], []
    start = 0
    for count in images_per_volume:
        images = range(start, start + count)
        kept = [i for i in images if keep[i]]
        split = change_split(budget, [change[i] for i in kept], tokens[kept[0]]) if kept else []
        allocated = dict(zip(kept, split, strict=True))
        for i in images:
            b = allocated.get(i, tokens[i])
            c = context_targets(b, tokens[i], context_frac) if merge and i in allocated else 0
            share.append(b)
            picks.append(b - c)
            targets.append(c)
        start += count
    return share, picks, targets


def context_targets(kept: int, tokens_per_slice: int, context_frac: float) -> int:
    """Contextual (merge) targets of a budgeted slice that keeps ``kept`` of its ``tokens_per_slice``
    tokens: ``min(kept - 1, max(int(context_frac * n), 1))``, 0 for a slice that keeps one token."""
    return max(min(kept - 1, max(int(context_frac * tokens_per_slice), 1)), 0)


def budget_counts(
    budget: float | int | None,
    slice_keep: torch.Tensor,
    image_row: torch.Tensor,
    tokens: torch.Tensor,
    num_volumes: int,
    *,
    merge: bool,
    context_frac: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The device form of :func:`budget_split` and :func:`context_targets`, for a whole batch at once
    and without host syncs (the HF pipeline and the vLLM processor use it; tests/test_budget.py checks
    it against the host rule on many batches).

    slice_keep: bool ``[I]``, the IAF mask of the batch's images (slices, volumes in order); image_row:
    int64 ``[I]``, the volume of each image; tokens: int64 ``[I]``, tokens per image (all kept slices of
    a volume share one count). Returns per image (tokens kept, of which DINS picks, contextual targets),
    or None without a budget; a dropped slice gets (all its tokens, all of them, 0): it takes no part.
    """
    if budget is None:
        return None
    device = slice_keep.device
    kept = slice_keep.long()
    k = torch.zeros(num_volumes, dtype=torch.long, device=device).index_add_(0, image_row, kept)
    n = torch.zeros_like(k).index_add_(0, image_row, tokens * kept) // k.clamp(min=1)
    if isinstance(budget, float):
        total = torch.ceil(budget * (k * n).double()).long()
    else:
        total = torch.full_like(k, budget)
    total = torch.minimum(torch.maximum(total, k), k * n)
    # the rank of each kept slice among its volume's kept slices, in slice order
    rank = torch.cumsum(kept, 0) - kept - torch.cumsum(k, 0)[image_row] + k[image_row]
    k_i = k[image_row].clamp(min=1)
    share = total[image_row] // k_i + (rank < total[image_row] % k_i).long()
    if merge:
        per_slice = (context_frac * tokens.double()).long().clamp(min=1)
        targets = torch.minimum(share - 1, per_slice).clamp(min=0)
    else:
        targets = torch.zeros_like(share)
    share = torch.where(slice_keep, share, tokens)
    targets = torch.where(slice_keep, targets, 0)
    return share, share - targets, targets


@dataclass
class PruneStats:
    """What the last pruned request kept. Lists are per volume (one per batch row).

    slices_total / slices_kept: slices per volume before and after IAF.
    tokens_per_slice: visual tokens kept per slice, for every slice of the volume (a slice dropped by IAF
        shows 0 in fast mode and 1 in paper mode, where it keeps its first token).
    tokens_before / tokens_after: visual tokens of the whole batch before and after pruning.
    retention: tokens_after / tokens_before.
    slices_encoded: slices that went through the vision tower (all of them in paper mode).
    budget: the config's fixed budget (None: adaptive DINS); tokens_per_volume gives the counts.
    prune_seconds: wall time of the pruning stage (vision tower included), measured on the host after
        the request's last read, so it covers the queued device work.
    token_scores / token_keep: only with ``MedPrunerConfig.record_tokens``: float32 and bool CPU
        tensors over every token of the encoded slices (flat, in encoding order): the DINS importance
        and the final keep mask (merge targets included).
    """

    mode: str
    slices_total: list[int] = field(default_factory=list)
    slices_kept: list[int] = field(default_factory=list)
    tokens_per_slice: list[list[int]] = field(default_factory=list)
    tokens_before: int = 0
    tokens_after: int = 0
    slices_encoded: int = 0
    budget: float | int | None = None
    prune_seconds: float = 0.0
    token_scores: torch.Tensor | None = None
    token_keep: torch.Tensor | None = None

    @property
    def retention(self) -> float:
        return self.tokens_after / self.tokens_before if self.tokens_before else 1.0

    @property
    def tokens_per_volume(self) -> list[int]:
        return [sum(per_slice) for per_slice in self.tokens_per_slice]

    def summary(self) -> str:
        budget = "" if self.budget is None else f", budget {self.budget}"
        return (
            f"medpruner[{self.mode}]: slices {sum(self.slices_kept)}/{sum(self.slices_total)} kept "
            f"({self.slices_encoded} encoded), visual tokens {self.tokens_after}/{self.tokens_before} "
            f"({100.0 * self.retention:.1f}%){budget}, {1e3 * self.prune_seconds:.1f} ms"
        )
