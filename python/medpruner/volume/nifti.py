"""NIfTI-1/2 and MGH files through nibabel (imported only when such a file is loaded)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from medpruner.volume.base import (
    Volume,
    VolumeError,
    closest_to_z,
    file_suffix,
    finish_volume,
    frame_message,
    read_error,
)

NIBABEL_SUFFIXES = (".nii", ".nii.gz", ".mgz", ".mgh")
_COMPRESSED_SUFFIXES = (".nii.gz", ".mgz")
# Deflate cannot expand data by more than about 1032:1 (a 258-byte match per 2 bits at best): a
# compressed file claiming more voxel bytes than that is corrupt, whatever its header says.
GZIP_MAX_RATIO = 1032


def available_memory() -> int | None:
    """Bytes of memory available now (Linux ``MemAvailable``, else the physical memory), or None."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def check_claimed_size(path: Path, image, shape: tuple[int, ...], frame_bytes: int) -> None:
    """Refuse a header whose voxel data cannot be in the file (before anything is allocated).

    ``shape``: the image's shape; ``frame_bytes``: what the load will allocate (one frame of a 4D
    image). Uncompressed: the file must hold the data offset plus every voxel's bytes. Compressed: the
    claimed bytes must not exceed what gzip could expand the file to. Either way the bytes to allocate
    must fit in the available memory."""
    header = image.header
    itemsize = np.dtype(header.get_data_dtype()).itemsize
    claimed = math.prod(shape) * itemsize
    file_size = path.stat().st_size
    if file_suffix(path) in _COMPRESSED_SUFFIXES:
        if claimed > file_size * GZIP_MAX_RATIO:
            raise VolumeError(
                path,
                f"corrupt header: it claims {shape} voxels of {itemsize} bytes ({claimed:,} bytes), more "
                f"than gzip can expand this {file_size:,}-byte file to",
            )
    else:
        # The proxy's offset is where nibabel reads (a NIfTI-1 vox_offset of 0 means after the header).
        offset = int(getattr(image.dataobj, "offset", 0) or 0)
        if offset + claimed > file_size:
            raise VolumeError(
                path,
                f"truncated or corrupt: the header claims {shape} voxels of {itemsize} bytes at offset "
                f"{offset} ({offset + claimed:,} bytes), the file holds {file_size:,}",
            )
    memory = available_memory()
    if memory is not None and frame_bytes > memory:
        raise VolumeError(
            path, f"the volume needs {frame_bytes:,} bytes, more than the {memory:,} bytes of memory available"
        )


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
        itemsize = max(np.dtype(image.header.get_data_dtype()).itemsize, 4)
    except (TypeError, ValueError) as err:
        raise read_error(path, "the image header", err) from err
    # Scaled data becomes float32 or wider: count at least 4 bytes per voxel allocated.
    check_claimed_size(path, image, tuple(int(n) for n in image.shape), math.prod(shape[:3]) * itemsize)
    try:
        proxy = image.dataobj
        if len(shape) == 4:
            frames = shape[3]
            if frame is None and frames > 1:
                raise VolumeError(path, frame_message(frames, shape))
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
