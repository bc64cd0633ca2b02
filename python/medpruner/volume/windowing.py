"""Intensities to [0, 1] (CT through a Hounsfield window, anything else through percentiles), and the
models' [-1, 1] scale on which ``gamma`` is defined (DESIGN.md)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from medpruner.volume.base import Volume, VolumeError, sample_voxels

# Standard (level, width) pairs in Hounsfield units, as used on radiology workstations.
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "abdomen": (40.0, 400.0),
    "lung": (-600.0, 1500.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
    "mediastinum": (50.0, 350.0),
}

# MRI (and anything that is not in Hounsfield units) is scaled between these percentiles: robust to
# the few very bright voxels (vessels, fat, artefacts) that would squash the rest of the range.
DEFAULT_PERCENTILES = (0.5, 99.5)


@dataclass(frozen=True)
class Window:
    """How raw intensities become [0, 1]: a CT window (level, width in HU) or percentile scaling."""

    kind: str
    name: str
    level: float | None = None
    width: float | None = None
    low: float | None = None
    high: float | None = None

    def describe(self) -> dict:
        out = {"kind": self.kind, "name": self.name}
        if self.kind == "ct":
            out.update(level=self.level, width=self.width)
        elif self.kind == "percentile":
            out.update(low_percentile=self.low, high_percentile=self.high)
        return out

    def text(self) -> str:
        """One line for people: what the window did."""
        if self.kind == "ct":
            return f"{self.name} (level {self.level:g}, width {self.width:g} HU)"
        if self.kind == "unit":
            return "none: intensities already in [0, 1] (clipped to it)"
        return f"percentiles {self.low:g}..{self.high:g}"


UNIT_WINDOW = Window("unit", "unit")

# The policy for NaN/Inf voxels in a volume that has finite ones, applied before any windowing.
NONFINITE_POLICY = "NaN -> the finite minimum, +Inf -> the finite maximum, -Inf -> the finite minimum"


def _ct_window(name: str, level: float, width: float) -> Window:
    if not (math.isfinite(level) and math.isfinite(width)) or width <= 0:
        raise ValueError(f"window: level must be finite and width positive, got level={level}, width={width}")
    return Window("ct", name, level=float(level), width=float(width))


def resolve_window(window, volume: Volume | None = None) -> Window:
    """Turn a window spec into a :class:`Window`.

    ``window``: a preset name (``abdomen``, ``lung``, ``bone``, ``brain``, ``mediastinum``), ``"L,W"``
    or a ``(level, width)`` pair in HU, ``"percentile"`` (MRI-style, 0.5..99.5), ``"unit"`` (intensities
    already in [0, 1], e.g. synthetic volumes: only clipped), or ``"auto"``: for CT
    the window recorded in the DICOM file when there is one, else ``abdomen``; percentiles otherwise.
    """
    if isinstance(window, Window):
        return window
    if isinstance(window, (tuple, list)):
        if len(window) != 2:
            raise ValueError(f"window: a (level, width) pair needs two numbers, got {window!r}")
        level, width = (float(v) for v in window)
        return _ct_window(f"{level:g},{width:g}", level, width)
    if not isinstance(window, str):
        raise TypeError(
            f"window must be a preset name, 'L,W', 'percentile', 'auto' or (level, width); got {window!r}"
        )
    spec = window.strip().lower()
    if spec in CT_WINDOWS:
        return _ct_window(spec, *CT_WINDOWS[spec])
    if spec == "unit":
        return UNIT_WINDOW
    if spec == "percentile":
        return Window("percentile", "percentile", low=DEFAULT_PERCENTILES[0], high=DEFAULT_PERCENTILES[1])
    if spec == "auto":
        if volume is not None and volume.modality.upper() == "CT":
            if volume.window_hint is not None:
                return _ct_window("dicom", *volume.window_hint)
            return _ct_window("abdomen", *CT_WINDOWS["abdomen"])
        return resolve_window("percentile")
    if "," in spec:
        parts = spec.split(",")
        try:
            level, width = (float(p) for p in parts)
        except ValueError as err:
            raise ValueError(f"window: expected 'LEVEL,WIDTH' (two numbers), got {window!r}") from err
        return _ct_window(f"{level:g},{width:g}", level, width)
    raise ValueError(
        f"window: unknown {window!r}; use one of {sorted(CT_WINDOWS)}, 'L,W' (HU), 'percentile', 'unit' or 'auto'"
    )


def window_ct(hu, level: float, width: float) -> np.ndarray:
    """Hounsfield units -> [0, 1]: ``clip((hu - (level - width / 2)) / width, 0, 1)`` in float32.
    NaN becomes 0."""
    window = _ct_window("custom", float(level), float(width))
    out = np.asarray(hu, dtype=np.float32) - np.float32(window.level - window.width / 2)
    out *= np.float32(1.0 / window.width)
    np.clip(out, 0.0, 1.0, out=out)
    np.nan_to_num(out, copy=False, nan=0.0)
    return out


def scale_percentile(
    values, low: float = DEFAULT_PERCENTILES[0], high: float = DEFAULT_PERCENTILES[1]
) -> np.ndarray:
    """Intensities -> [0, 1] between the ``low`` and ``high`` percentiles (of at most 4M voxels,
    subsampled regularly beyond), in float32. NaN is ignored by the percentiles and becomes 0; a
    constant volume becomes all 0."""
    if not 0 <= low < high <= 100:
        raise ValueError(f"scale_percentile: need 0 <= low < high <= 100, got low={low}, high={high}")
    array = np.asarray(values)
    sample = sample_voxels(array).astype(np.float64)
    finite = sample[np.isfinite(sample)]
    out = (
        np.asarray(array, dtype=np.float32).copy() if array.dtype == np.float32 else array.astype(np.float32)
    )
    if finite.size == 0:
        return np.zeros_like(out)
    lo, hi = np.percentile(finite, (low, high))
    if hi <= lo:
        return np.zeros_like(out)
    out -= np.float32(lo)
    out *= np.float32(1.0 / (hi - lo))
    np.clip(out, 0.0, 1.0, out=out)
    np.nan_to_num(out, copy=False, nan=0.0)
    return out


def apply_window(data, window: Window) -> np.ndarray:
    if window.kind == "ct":
        return window_ct(data, window.level, window.width)
    if window.kind == "unit":
        out = np.clip(np.asarray(data, dtype=np.float32), 0.0, 1.0)
        return np.nan_to_num(out, copy=False, nan=0.0)
    return scale_percentile(data, window.low, window.high)


def replace_nonfinite(data, source=None) -> tuple[np.ndarray, dict | None, float | None]:
    """Apply :data:`NONFINITE_POLICY` -> ``(data, nonfinite, constant_value)``.

    ``nonfinite``: None when every voxel is finite, else the counts replaced (``nan``, ``posinf``,
    ``neginf``), the policy and the finite range used. ``constant_value``: the one finite value of a
    constant volume, else None. A volume with no finite voxel is a :class:`VolumeError`: nothing in it
    can be windowed or compared. ``data`` is returned as it is (no copy) when nothing is replaced."""
    array = np.asarray(data)
    if not np.issubdtype(array.dtype, np.floating):
        if array.size == 0:
            return array, None, None
        low, high = array.min(), array.max()
        return array, None, (float(low) if low == high else None)
    finite = np.isfinite(array)
    finite_count = int(np.count_nonzero(finite))
    if finite_count == 0:
        raise VolumeError(source, f"no finite voxel value: all {array.size} voxels are NaN or Inf")
    low = float(array.min(where=finite, initial=np.inf))
    high = float(array.max(where=finite, initial=-np.inf))
    constant = low if low == high else None
    if finite_count == array.size:
        return array, None, constant
    nan = int(np.count_nonzero(np.isnan(array)))
    posinf = int(np.count_nonzero(np.isposinf(array)))
    info = {
        "nan": nan,
        "posinf": posinf,
        "neginf": array.size - finite_count - nan - posinf,
        "voxels": int(array.size),
        "policy": NONFINITE_POLICY,
        "finite_min": low,
        "finite_max": high,
    }
    replaced = np.nan_to_num(array, copy=True, nan=low, posinf=high, neginf=low)
    return replaced, info, constant


def normalize(volume, window="auto") -> tuple[np.ndarray, Window]:
    """A volume's slices in [0, 1] (float32 ``[D, H, W]``) and the window that was used.

    ``volume``: a :class:`Volume` (``auto`` then looks at its modality) or an array. NaN/Inf voxels
    are first replaced by :data:`NONFINITE_POLICY`; on a :class:`Volume` the counts are recorded in
    ``volume.nonfinite`` and a constant volume's value in ``volume.constant_value``. A volume without
    any finite voxel is a :class:`VolumeError`.
    """
    if isinstance(volume, Volume):
        data, volume.nonfinite, volume.constant_value = replace_nonfinite(volume.data, volume.source)
        chosen = resolve_window(window, volume)
        return apply_window(data, chosen), chosen
    chosen = resolve_window(window, None)
    data, _, _ = replace_nonfinite(volume)
    return apply_window(data, chosen), chosen


def to_model_range(unit):
    """[0, 1] -> the processors' [-1, 1] (mean = std = 0.5): ``2 x - 1``. numpy or torch."""
    return unit * 2 - 1


def from_model_range(signed):
    """[-1, 1] -> [0, 1]."""
    return (signed + 1) / 2


def gamma_for_unit_range(gamma: float) -> float:
    """The IAF threshold on [0, 1] slices that means ``gamma`` on the [-1, 1] scale: mean |a - b|
    halves when both slices are mapped by x -> (x + 1) / 2, so it is ``gamma / 2``."""
    if (
        isinstance(gamma, bool)
        or not isinstance(gamma, (int, float, np.integer, np.floating))
        or not math.isfinite(gamma)
    ):
        raise ValueError(f"gamma must be a finite number, got {gamma!r}")
    return float(gamma) / 2.0
