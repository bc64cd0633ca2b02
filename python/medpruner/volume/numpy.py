"""numpy arrays (and torch tensors, through numpy) and ``.npy``/``.npz`` files."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from medpruner.volume.base import Volume, VolumeError, file_suffix, finish_volume, read_error

NUMPY_SUFFIXES = (".npy", ".npz")


def _array_affine(spacing) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = np.diag(spacing)
    return affine


def _check_spacing(source, spacing) -> tuple[float, float, float]:
    if spacing is None:
        return (1.0, 1.0, 1.0)
    try:
        values = tuple(float(s) for s in spacing)
    except (TypeError, ValueError) as err:
        raise VolumeError(source, f"spacing must be three positive numbers, got {spacing!r}") from err
    if len(values) != 3 or not all(math.isfinite(s) and s > 0 for s in values):
        raise VolumeError(source, f"spacing must be three positive numbers, got {spacing!r}")
    return values


def from_array(source, array: np.ndarray, slice_axis, spacing, modality, dtype) -> Volume:
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3:
        raise VolumeError(
            source, f"an array volume must be [D, H, W] (or one [H, W] slice), got shape {tuple(array.shape)}"
        )
    # The caller's spacing is given in the array's own axis order, like the array.
    affine = _array_affine(_check_spacing(source, spacing))
    return finish_volume(
        source,
        array,
        affine,
        slice_axis=slice_axis,
        default_axis=0,
        default_reason="axis 0 (arrays are taken as [D, H, W])",
        reverse_in_plane=False,
        assumed=() if spacing is not None else ("spacing", "orientation"),
        modality=modality,
        dtype=dtype,
    )


def _pickled(err: Exception) -> bool:
    """numpy's refusal of a file that is pickled (or holds object arrays): its message advises
    ``allow_pickle``, which a volume reader must never use on a file it was handed."""
    text = str(err)
    return "pickle" in text or "Python objects" in text


def load_numpy(path: Path, slice_axis, spacing, modality, dtype, key) -> Volume:
    try:
        if file_suffix(path) == ".npy":
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        else:
            with np.load(path, allow_pickle=False) as archive:
                names = list(archive.files)
                if key is not None:
                    if key not in names:
                        raise VolumeError(path, f"no array named {key!r} (it holds {names})")
                    chosen = key
                elif len(names) == 1:
                    chosen = names[0]
                else:
                    preferred = [n for n in ("volume", "image", "data") if n in names]
                    if not preferred:
                        raise VolumeError(
                            path,
                            f"holds several arrays {names} and none is named volume, image or data: "
                            "choose one with --key NAME (Python: load_volume(..., key=NAME))",
                        )
                    chosen = preferred[0]
                array = archive[chosen]
    except VolumeError:
        raise
    except MemoryError:
        raise
    except Exception as err:
        if _pickled(err):
            raise VolumeError(
                path, "not a numeric array: the file holds Python objects (pickled data), which are never loaded"
            ) from err
        raise read_error(path, "numpy data", err) from err
    return from_array(path, array, slice_axis, spacing, modality, dtype)
