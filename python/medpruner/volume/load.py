"""``load_volume``: picks the loader from the source's kind (array, tensor, folder, file suffix)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medpruner.volume.base import Volume, VolumeError, file_suffix
from medpruner.volume.dicom import DICOM_SUFFIXES, load_dicom_file, load_dicom_series, looks_like_dicom
from medpruner.volume.nifti import NIBABEL_SUFFIXES, load_nifti
from medpruner.volume.nrrd import NRRD_SUFFIXES, load_nrrd
from medpruner.volume.numpy import NUMPY_SUFFIXES, from_array, load_numpy

SUPPORTED_SUFFIXES = NIBABEL_SUFFIXES + NRRD_SUFFIXES + NUMPY_SUFFIXES + DICOM_SUFFIXES


def load_volume(
    source,
    *,
    slice_axis: int | None = None,
    frame: int | None = None,
    spacing: Sequence[float] | None = None,
    modality: str | None = None,
    key: str | None = None,
    dtype=None,
) -> Volume:
    """Load a volume as ``[D, H, W]`` slices.

    Args:
        source: a path (NIfTI ``.nii``/``.nii.gz``, MGH ``.mgz``/``.mgh``, NRRD ``.nrrd``/``.nhdr``,
            ``.npy``/``.npz``, a DICOM file, or a folder holding one DICOM series), a numpy array or a
            torch tensor (``[D, H, W]``, or one ``[H, W]`` slice).
        slice_axis: axis of the source array to slice along. Default: the acquisition axis, i.e.
            NIfTI: the header's slice dimension (``dim_info``) when recorded, else the voxel axis whose
            direction in the affine is closest to the scanner's z; NRRD: the axis closest to z from
            its space directions; DICOM: the slice normal (series sorted by ImagePositionPatient
            projected on the normal of ImageOrientationPatient; multi-frame files by their per-frame
            positions); arrays: axis 0.
        frame: which 3D frame of a 4D image (NIfTI, NRRD) to take; required when there are several.
        spacing: voxel size in mm of an array source, in its axis order (default 1 mm).
        modality: "CT" or "MR" to override the guess (DICOM's Modality tag; otherwise "CT" when at
            least 1% of the voxels are at or below -900, i.e. air in Hounsfield units).
        key: which array of an ``.npz`` holding several (default: the only one, else "volume",
            "image" or "data").
        dtype: numpy dtype to convert to; None keeps the stored type (memory-mapped for unscaled
            uncompressed NIfTI and ``.npy``), except that float64 becomes float32. DICOM with a
            RescaleSlope/Intercept is float32 in Hounsfield (or the modality's) units.

    Raises:
        VolumeError (a ValueError): missing, empty, truncated, corrupt or unsupported input; mixed
            DICOM series; the message names the file and the reason.
    """
    if isinstance(source, np.ndarray):
        return from_array(None, source, slice_axis, spacing, modality, dtype)
    if type(source).__module__.startswith("torch"):
        import torch

        if isinstance(source, torch.Tensor):
            tensor = source.detach().cpu()
            if tensor.dtype in (torch.bfloat16, torch.float16):
                tensor = tensor.float()
            return from_array(None, tensor.numpy(), slice_axis, spacing, modality, dtype)
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(
            f"load_volume: source must be a path, numpy array or torch tensor, got {type(source).__name__}"
        )

    path = Path(source)
    if not path.exists():
        raise VolumeError(path, "no such file or folder")
    if path.is_dir():
        return load_dicom_series(path, slice_axis, modality, dtype)
    if path.stat().st_size == 0:
        raise VolumeError(path, "file is empty")
    suffix = file_suffix(path)
    if suffix in NIBABEL_SUFFIXES:
        return load_nifti(path, slice_axis, frame, modality, dtype)
    if suffix in NRRD_SUFFIXES:
        return load_nrrd(path, slice_axis, frame, modality, dtype)
    if suffix in NUMPY_SUFFIXES:
        return load_numpy(path, slice_axis, spacing, modality, dtype, key)
    if suffix in DICOM_SUFFIXES or looks_like_dicom(path):
        return load_dicom_file(path, slice_axis, modality, dtype)
    raise VolumeError(
        path,
        f"unsupported format {suffix or '(no extension)'!r}; supported: {', '.join(SUPPORTED_SUFFIXES)}, "
        "DICOM files and DICOM series folders",
    )
