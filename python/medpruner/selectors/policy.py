"""A selection policy: the two stages the pruning pipeline (HF, vLLM) calls, and the policy that runs
any registered method of the eval inside it.

The pipeline owns the layout (where each image's pixels and tokens are), the encoder, the positions and
the packaging; a policy decides what is kept:

* ``select_slices(slice_pixels, volume_cu, *, config, max_seqlen, slice_tokens, first) -> keep``, before
  the encoder, once per run of equally sized images of the batch: ``slice_pixels`` ``[S, P]`` on the
  [-1, 1] scale, ``volume_cu`` int32 ``[V+1]`` slice offsets of the run's volumes, ``slice_tokens`` the
  host token count of each slice, ``first`` the batch index of the run's first image. Returns bool
  ``[S]``; a dropped slice is not encoded in the fast mode (it loses its wrapper tokens).
* ``select_tokens(scores, keys, features, slice_cu, slice_keep, budget, *, config, temperature,
  slice_tokens, slices, grid) -> (token_keep, features)``, after it, over the encoded slices' tokens,
  flat (``slice_cu`` int32 their offsets): ``slice_keep`` the slice mask of the encoded slices in paper
  mode (every slice encoded), None in fast mode; ``budget`` the config's fixed-budget counts per encoded
  slice (kept, DINS picks, targets; :func:`medpruner.config.budget_counts`) or None; ``temperature``
  the family's DINS temperature; ``slices`` the batch indices of the encoded images; ``grid`` the
  (rows, cols) of LLM tokens per image when the policy asks for it (``wants_grid``), else None.

:class:`~medpruner.selectors.medpruner.MedPrunerPolicy` is the default (sync-free, whole batch);
:class:`SelectorPolicy` runs a registered method volume by volume (host reads allowed: the eval).
"""

from __future__ import annotations

from typing import Any

import torch

from medpruner.selectors.base import SelectResult, finish, get_selector, scatter_tokens, slice_of_token

__all__ = ["Policy", "SelectorPolicy"]

# The knobs a method may take, filled from the run's settings when one of its stages takes them.
SHARED_OPTIONS = ("gamma", "gamma_local", "tau", "temperature", "merge", "context_frac", "backend")


class Policy:
    """The interface (see the module docstring). ``wants_grid``: the pipeline passes each image's token
    grid to :meth:`select_tokens` (a host read of the processor's grid); ``wants_blocks``: it passes
    ``iaf_block`` to :meth:`select_slices`, with the pixels laid out in blocks."""

    name = "policy"
    wants_grid = False
    wants_blocks = False

    def check_config(self, config) -> None:
        """ValueError for a pipeline config this policy cannot run under."""

    def select_slices(self, slice_pixels, volume_cu, *, config, **context) -> torch.Tensor:
        raise NotImplementedError

    def select_tokens(self, scores, keys, features, slice_cu, slice_keep, budget, *, config, **context):
        raise NotImplementedError


class SelectorPolicy(Policy):
    """A registered method (:data:`medpruner.selectors.SELECTORS`) as a pipeline policy, one volume at a
    time: its slice stage on each volume's pixels, its token stage on the tokens of each volume's kept
    slices, as :meth:`SelectorSpec.select` runs them.

    budgets: per volume of a request (batch row), the budget of a budgeted method (the count the
    adaptive MedPruner kept), None otherwise; settings: the shared knobs (gamma, tau, merge,
    context_frac) passed to the stages that take them (the DINS temperature is the model family's, the
    backend the config's); seed: the generator of volume v is seeded with ``seed + v``.
    ``selections``: the :class:`SelectResult` of each volume of the last request (over all its slices
    and tokens; the features of a dropped slice, never encoded, are zeros)."""

    wants_grid = True

    def __init__(self, method: str, *, budgets=None, settings: dict[str, Any] | None = None, seed: int = 0):
        self.spec = get_selector(method)
        if self.spec.budgeted and budgets is None:
            raise ValueError(f"method {method!r} needs budgets (the token counts the adaptive MedPruner kept)")
        self.name = self.spec.name
        self.budgets = None if budgets is None else list(budgets)
        self.settings = dict(settings or {})
        self.seed = int(seed)
        self.selections: list[SelectResult] = []
        self._slices: dict[int, tuple[torch.Tensor, list[int]]] = {}

    def check_config(self, config) -> None:
        if config.mode != "fast" or config.budget is not None:
            raise ValueError("selector runs use the fast mode without a config budget (the selector decides both "
                             "stages)")

    def _options(self, config, temperature=None) -> dict[str, Any]:
        values = {**self.settings, "backend": config.backend}
        if temperature is not None:
            values["temperature"] = temperature
        accepted = self.spec.options()
        return {name: values[name] for name in SHARED_OPTIONS if name in accepted and name in values}

    def _budget(self, volume: int):
        if self.budgets is None:
            return None
        if volume >= len(self.budgets):
            raise ValueError(f"{self.name}: {len(self.budgets)} budgets for more volumes")
        return self.budgets[volume]

    @property
    def wants_blocks(self) -> bool:
        """The pipeline passes ``iaf_block`` (and lays the pixels out in blocks) when the method's slice
        stage takes it."""
        return "iaf_block" in self.spec.options()

    def select_slices(self, slice_pixels, volume_cu, *, config, slice_tokens, first=0, iaf_block=None, **context):
        if first == 0:
            self._slices = {}
        bounds = volume_cu.tolist()
        keeps = []
        # a run of images holds whole volumes; the others show as empty (volume_cu is clamped to the run)
        for volume, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
            if a == b:
                continue
            offsets = [0]
            for n in slice_tokens[a:b]:
                offsets.append(offsets[-1] + n)
            slice_cu = torch.tensor(offsets, dtype=torch.int32, device=slice_pixels.device)
            blocks = {"iaf_block": iaf_block} if self.wants_blocks else {}
            keep, change = self.spec.select_slices(slice_pixels[a:b], slice_cu, self._budget(volume),
                                                   generator=self._generator(volume, slice_pixels.device),
                                                   **self._options(config), **blocks)
            keep = keep.to(torch.bool)
            self._slices[volume] = (first + a, keep, slice_cu, None if change is None else change[keep])
            keeps.append(keep)
        return torch.cat(keeps)

    def _generator(self, volume: int, device) -> torch.Generator:
        return torch.Generator(device=device).manual_seed(self.seed + volume)

    def select_tokens(self, scores, keys, features, slice_cu, slice_keep, budget, *, config, temperature=None,
                      slices=None, grid=None, **context):
        if self.budgets is not None and len(self.budgets) != len(self._slices):
            raise ValueError(f"{self.name}: {len(self.budgets)} budgets for {len(self._slices)} volumes")
        encoded = list(range(slice_cu.numel() - 1)) if slices is None else list(slices)
        offsets = slice_cu.tolist()
        options = self._options(config, temperature)
        keeps, outs, self.selections = [], [], []
        position = 0
        for volume in sorted(self._slices):
            first, volume_keep, volume_cu, change = self._slices[volume]
            count = int(volume_keep.sum())
            mine = encoded[position : position + count]
            if [i - first for i in mine] != volume_keep.nonzero().flatten().tolist():
                raise ValueError(f"{self.name}: the encoded slices are not the slices the slice stage kept")
            start, end = offsets[position], offsets[position + count]
            position += count
            sub_cu = slice_cu[position - count : position + 1] - start
            extra = {} if grid is None or "grid" not in self.spec.options() else {"grid": grid[first]}
            if change is not None:
                extra["slice_change"] = change  # dropped by select_tokens when the stage does not take it
            keep, out = self.spec.select_tokens(
                scores[start:end].float(), keys[start:end].float(), features[start:end], sub_cu,
                self._budget(volume), generator=self._generator(volume, scores.device), **options, **extra,
            )
            out = features[start:end] if out is None else out
            keeps.append(keep)
            outs.append(out)
            index = volume_keep[slice_of_token(volume_cu)].nonzero().flatten()
            full = torch.zeros(int(volume_cu[-1]), out.shape[1], dtype=out.dtype, device=out.device)
            token_keep, full = scatter_tokens(index, keep, out, full, int(volume_cu[-1]))
            self.selections.append(finish(volume_keep, token_keep, full, volume_cu))
        if position != len(encoded):
            raise ValueError(f"{self.name}: the selection covers {position} encoded slices, the tower returned "
                             f"{len(encoded)}")
        return torch.cat(keeps), torch.cat(outs).to(features.dtype)

