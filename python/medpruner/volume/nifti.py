"""NIfTI-1/2 and MGH files through nibabel (imported only when such a file is loaded)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medpruner.volume.base import Volume, VolumeError, closest_to_z, finish_volume, read_error

NIBABEL_SUFFIXES = (".nii", ".nii.gz", ".mgz", ".mgh")


def load_nifti(path: Path, slice_axis, frame, modality, dtype) -> Volume:
    import nibabel as nib

    try:
        image = nib.load(str(path), mmap=True)
    except Exception as err:
        raise read_error(path, "the image header", err) from err
    shape = tuple(int(n) for n in image.shape)
    # Trailing singleton dims (NIfTI writers often store [X, Y, Z, 1]) carry nothing.
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) not in (3, 4):
        raise VolumeError(path, f"expected a 3D or 4D image, got shape {tuple(image.shape)}")
    try:
        proxy = image.dataobj
        if len(shape) == 4:
            frames = shape[3]
            if frame is None and frames > 1:
                raise VolumeError(
                    path, f"4D image with {frames} frames (shape {shape}): pass frame=0..{frames - 1}"
                )
            index = 0 if frame is None else frame
            if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not 0 <= index < frames:
                raise VolumeError(path, f"frame must be an int in [0, {frames}), got {frame!r}")
            array = np.asarray(proxy[..., int(index)]).reshape(shape[:3])
        else:
            # asanyarray keeps nibabel's memory map of an unscaled uncompressed file.
            array = np.asanyarray(proxy).reshape(shape)
            if not isinstance(array, np.memmap):
                array = np.asarray(array)
    except VolumeError:
        raise
    except MemoryError:
        raise
    except Exception as err:
        raise read_error(path, "the voxel data (truncated or corrupt file?)", err) from err

    affine = np.asarray(image.affine, dtype=np.float64)
    default_axis, reason = closest_to_z(affine), "the voxel axis closest to the scanner's z (affine)"
    header = image.header
    if hasattr(header, "get_dim_info"):
        slice_dim = header.get_dim_info()[2]
        if slice_dim is not None and slice_dim < 3:
            default_axis, reason = (
                int(slice_dim),
                "the slice dimension recorded in the NIfTI header (dim_info)",
            )
    return finish_volume(
        path,
        array,
        affine,
        slice_axis=slice_axis,
        default_axis=default_axis,
        default_reason=reason,
        reverse_in_plane=True,
        modality=modality,
        dtype=dtype,
    )
