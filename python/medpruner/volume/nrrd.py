"""NRRD files through pynrrd (imported only when such a file is loaded)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medpruner.volume.base import Volume, VolumeError, closest_to_z, finish_volume, read_error, select_frame

NRRD_SUFFIXES = (".nrrd", ".nhdr")

_NRRD_SPACE_SIGNS = {
    "right-anterior-superior": (1.0, 1.0, 1.0),
    "ras": (1.0, 1.0, 1.0),
    "left-posterior-superior": (-1.0, -1.0, 1.0),
    "lps": (-1.0, -1.0, 1.0),
    "left-anterior-superior": (-1.0, 1.0, 1.0),
    "las": (-1.0, 1.0, 1.0),
}


def load_nrrd(path: Path, slice_axis, frame, modality, dtype) -> Volume:
    import nrrd

    try:
        array, header = nrrd.read(str(path))
    except Exception as err:
        raise read_error(path, "NRRD", err) from err
    array = np.asarray(array)
    directions = header.get("space directions")
    spatial = list(range(array.ndim))
    if directions is not None:
        directions = np.asarray(
            [[np.nan] * 3 if row is None else row for row in directions], dtype=np.float64
        )
        spatial = [a for a in range(array.ndim) if np.all(np.isfinite(directions[a]))]
    if array.ndim == 4:
        non_spatial = [a for a in range(4) if a not in spatial] or [3]
        array = select_frame(path, array, frame, non_spatial[0])
        if directions is not None:
            directions = np.delete(directions, non_spatial[0], axis=0)
    if array.ndim != 3:
        raise VolumeError(path, f"expected a 3D or 4D NRRD, got shape {tuple(array.shape)}")

    affine = np.eye(4)
    notes = []
    if directions is not None and directions.shape == (3, 3) and np.all(np.isfinite(directions)):
        affine[:3, :3] = directions.T
        origin = header.get("space origin")
        if origin is not None and np.all(np.isfinite(np.asarray(origin, dtype=np.float64))):
            affine[:3, 3] = np.asarray(origin, dtype=np.float64)
        space = str(header.get("space", "")).strip().lower()
        signs = _NRRD_SPACE_SIGNS.get(space)
        if signs is None:
            notes.append(f"NRRD space {space or 'unset'!r} is taken as RAS")
        else:
            affine[:3] *= np.asarray(signs)[:, None]
        default_axis, reason = (
            closest_to_z(affine),
            "the voxel axis closest to the scanner's z (space directions)",
        )
    else:
        spacings = header.get("spacings")
        if spacings is not None and len(spacings) == 3 and np.all(np.isfinite(spacings)):
            affine[:3, :3] = np.diag(np.asarray(spacings, dtype=np.float64))
        default_axis, reason = 2, "the last axis (the NRRD has no space directions)"
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
        notes=notes,
    )
