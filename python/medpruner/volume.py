"""Medical volumes as ``[D, H, W]`` slice stacks: loading, orientation, CT windowing, intensity scaling.

Every loader returns a :class:`Volume` whose ``data`` is ``[D, H, W]`` with ``D`` the slice axis (the
acquisition axis unless the caller picks another one), plus the geometry needed to place it in the
patient: per-axis spacing in mm and a 4x4 affine from ``(d, h, w)`` voxel indices to RAS+ millimetres
(the NIfTI convention; DICOM's LPS positions are converted).

Intensities: IAF and the models work on slices scaled to [0, 1] (CT through a Hounsfield window, MRI
through percentiles) and then to the processors' [-1, 1] (mean = std = 0.5). ``gamma`` always means a
mean absolute difference on that [-1, 1] scale (DESIGN.md); :func:`gamma_for_unit_range` gives the
threshold that means the same on [0, 1] slices.

Formats: NIfTI-1/2 and MGH (nibabel), DICOM series folders and single (multi-frame) DICOM files
(pydicom), NRRD (pynrrd), ``.npy``/``.npz``, numpy arrays and torch tensors. The format libraries are
imported only when a file of their kind is loaded.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = [
    "CT_WINDOWS",
    "SUPPORTED_SUFFIXES",
    "Volume",
    "VolumeError",
    "Window",
    "apply_window",
    "from_model_range",
    "gamma_for_unit_range",
    "load_volume",
    "normalize",
    "resolve_window",
    "scale_percentile",
    "to_model_range",
    "window_ct",
]

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

NIBABEL_SUFFIXES = (".nii", ".nii.gz", ".mgz", ".mgh")
NRRD_SUFFIXES = (".nrrd", ".nhdr")
NUMPY_SUFFIXES = (".npy", ".npz")
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
SUPPORTED_SUFFIXES = NIBABEL_SUFFIXES + NRRD_SUFFIXES + NUMPY_SUFFIXES + DICOM_SUFFIXES

# Air is -1000 HU; scanners pad outside the field of view with -1024 or lower. A volume with a
# noticeable share of such values is CT; MRI intensities are non-negative or only slightly negative.
_CT_AIR_HU = -900.0
_CT_AIR_FRACTION = 0.01
# Percentiles and the modality guess look at most this many voxels (a regular subsample beyond).
_SAMPLE_VOXELS = 1 << 22
# Tolerance on direction cosines when deciding that two DICOM files share an orientation.
_ORIENTATION_ATOL = 1e-4


class VolumeError(ValueError):
    """A volume that cannot be loaded: the message names the file and the reason."""

    def __init__(self, source, reason: str):
        self.source = None if source is None else str(source)
        self.reason = reason
        super().__init__(f"{source}: {reason}" if source is not None else reason)


@dataclass
class Volume:
    """A stack of 2D slices.

    Attributes:
        data: ``[D, H, W]`` numpy array (float32, or the file's own dtype, memory-mapped when the file
            allows it), ``D`` slices along ``slice_axis`` of the source.
        spacing: voxel size in mm along (D, H, W).
        affine: float64 ``[4, 4]``, ``(d, h, w, 1)`` voxel index -> RAS+ position in mm.
        modality: "CT" (values in Hounsfield units), "MR", or the DICOM Modality tag.
        source: file or folder it came from (None for in-memory arrays).
        slice_axis: which axis of the source array became ``D`` (NIfTI/NRRD: the stored (i, j, k) axes;
            DICOM: (frame, row, column); arrays: as given).
        slice_axis_reason: how that axis was chosen, for reports.
        window_hint: (level, width) the DICOM file recommends, if any.
    """

    data: np.ndarray
    spacing: tuple[float, float, float]
    affine: np.ndarray
    modality: str
    source: str | None = None
    slice_axis: int = 0
    slice_axis_reason: str = "given"
    window_hint: tuple[float, float] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.data.shape)

    @property
    def num_slices(self) -> int:
        return int(self.data.shape[0])

    @property
    def orientation(self) -> tuple[str, str, str]:
        """RAS+ axis codes of (D, H, W): each letter names the direction the index increases toward."""
        return axis_codes(self.affine)

    def display_flips(self) -> tuple[bool, bool]:
        """(flip rows, flip columns) that show a slice the radiological way: anterior/superior up,
        the patient's right on the image's left."""
        _, rows, cols = self.orientation
        return rows in ("A", "S"), cols in ("R", "A")

    def describe(self) -> dict:
        """JSON-ready summary (no voxel data)."""
        return {
            "source": self.source,
            "shape": list(self.shape),
            "dtype": str(self.data.dtype),
            "spacing_mm": [round(float(s), 6) for s in self.spacing],
            "orientation": "".join(self.orientation),
            "modality": self.modality,
            "slice_axis": self.slice_axis,
            "slice_axis_reason": self.slice_axis_reason,
            "window_hint": None if self.window_hint is None else list(self.window_hint),
            "notes": list(self.notes),
        }


# ------------------------------------------------------------------------------------------ geometry
def axis_codes(affine: np.ndarray) -> tuple[str, str, str]:
    """For each voxel axis, the RAS+ direction (R/L, A/P, S/I) it runs closest to."""
    codes = []
    for axis in range(3):
        direction = np.asarray(affine, dtype=np.float64)[:3, axis]
        world = int(np.argmax(np.abs(direction)))
        positive = direction[world] >= 0
        codes.append(("R", "A", "S")[world] if positive else ("L", "P", "I")[world])
    return tuple(codes)


def _closest_to_z(affine: np.ndarray) -> int:
    directions = np.asarray(affine, dtype=np.float64)[:3, :3]
    norms = np.linalg.norm(directions, axis=0)
    norms[norms == 0] = 1.0
    return int(np.argmax(np.abs(directions[2]) / norms))


def _reslice(
    array: np.ndarray, affine: np.ndarray, slice_axis: int, reverse_in_plane: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Put ``slice_axis`` first (a view, so memory maps stay memory maps) and fix the affine.

    NIfTI/NRRD store (x, y, z)-like axes, so an axial slice is (i, j) with j running along the image's
    rows; ``reverse_in_plane`` puts the later axis first (rows) and the earlier last (columns), which
    is how DICOM and image viewers lay a slice out. DICOM and arrays are already (rows, columns).
    """
    others = [a for a in range(3) if a != slice_axis]
    if reverse_in_plane:
        others.reverse()
    order = (slice_axis, *others)
    permutation = np.zeros((4, 4))
    for new_axis, old_axis in enumerate(order):
        permutation[old_axis, new_axis] = 1.0
    permutation[3, 3] = 1.0
    return np.transpose(array, order), np.asarray(affine, dtype=np.float64) @ permutation


def _spacing_from_affine(affine: np.ndarray) -> tuple[float, float, float]:
    return tuple(float(np.linalg.norm(affine[:3, axis])) for axis in range(3))


def _check_slice_axis(source, slice_axis) -> int:
    if (
        isinstance(slice_axis, bool)
        or not isinstance(slice_axis, (int, np.integer))
        or not -3 <= slice_axis < 3
    ):
        raise VolumeError(source, f"slice_axis must be 0, 1 or 2 (or -3..-1), got {slice_axis!r}")
    return int(slice_axis) % 3


# ---------------------------------------------------------------------------------------- modality
def _sample(data: np.ndarray) -> np.ndarray:
    flat = np.asarray(data).reshape(-1)
    step = max(1, math.ceil(flat.size / _SAMPLE_VOXELS))
    return flat[::step]


def guess_modality(data: np.ndarray) -> str:
    """ "CT" when at least 1% of the voxels are at or below -900 (air in Hounsfield units), else "MR"."""
    sample = _sample(data)
    signed = np.issubdtype(sample.dtype, np.signedinteger) or np.issubdtype(sample.dtype, np.floating)
    if sample.size == 0 or not signed:
        return "MR"
    return "CT" if np.count_nonzero(sample <= _CT_AIR_HU) >= _CT_AIR_FRACTION * sample.size else "MR"


# ------------------------------------------------------------------------------------------ loaders
def _suffix(path: Path) -> str:
    name = path.name.lower()
    for suffix in (".nii.gz",):
        if name.endswith(suffix):
            return suffix
    return path.suffix.lower()


def _looks_like_dicom(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def _wrap(path, what: str, err: BaseException) -> VolumeError:
    detail = str(err) or type(err).__name__
    return VolumeError(path, f"cannot read {what} ({type(err).__name__}: {detail})")


def _finish(
    source,
    array: np.ndarray,
    affine: np.ndarray,
    *,
    slice_axis: int | None,
    default_axis: int,
    default_reason: str,
    reverse_in_plane: bool,
    modality: str | None,
    dtype,
    window_hint=None,
    notes=(),
) -> Volume:
    if array.ndim != 3:
        raise VolumeError(source, f"expected a 3D volume, got an array of shape {tuple(array.shape)}")
    if min(array.shape) == 0:
        raise VolumeError(source, f"volume is empty (shape {tuple(array.shape)})")
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_) or np.iscomplexobj(array):
        raise VolumeError(source, f"unsupported voxel type {array.dtype} (need real numbers)")
    if slice_axis is None:
        axis, reason = default_axis, default_reason
    else:
        axis, reason = _check_slice_axis(source, slice_axis), "given by the caller"
    data, new_affine = _reslice(array, affine, axis, reverse_in_plane)
    if dtype is not None:
        data = np.asarray(data, dtype=dtype)
    elif data.dtype == np.float64 or data.dtype == np.bool_:
        # float64 only doubles memory (every consumer computes in float32); bool masks become numbers.
        data = data.astype(np.float32)
    return Volume(
        data=data,
        spacing=_spacing_from_affine(new_affine),
        affine=new_affine,
        modality=modality or guess_modality(data),
        source=None if source is None else str(source),
        slice_axis=axis,
        slice_axis_reason=reason,
        window_hint=window_hint,
        notes=list(notes),
    )


def _select_frame(path, array: np.ndarray, frame: int | None, frame_axis: int) -> np.ndarray:
    frames = array.shape[frame_axis]
    if frame is None:
        if frames == 1:
            return np.take(array, 0, axis=frame_axis)
        raise VolumeError(
            path, f"4D image with {frames} frames (shape {tuple(array.shape)}): pass frame=0..{frames - 1}"
        )
    if isinstance(frame, bool) or not isinstance(frame, (int, np.integer)) or not 0 <= frame < frames:
        raise VolumeError(path, f"frame must be an int in [0, {frames}), got {frame!r}")
    return np.take(array, int(frame), axis=frame_axis)


def _load_nibabel(path: Path, slice_axis, frame, modality, dtype) -> Volume:
    import nibabel as nib

    try:
        image = nib.load(str(path), mmap=True)
    except Exception as err:
        raise _wrap(path, "the image header", err) from err
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
        raise _wrap(path, "the voxel data (truncated or corrupt file?)", err) from err

    affine = np.asarray(image.affine, dtype=np.float64)
    default_axis, reason = _closest_to_z(affine), "the voxel axis closest to the scanner's z (affine)"
    header = image.header
    if hasattr(header, "get_dim_info"):
        slice_dim = header.get_dim_info()[2]
        if slice_dim is not None and slice_dim < 3:
            default_axis, reason = (
                int(slice_dim),
                "the slice dimension recorded in the NIfTI header (dim_info)",
            )
    return _finish(
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


_NRRD_SPACE_SIGNS = {
    "right-anterior-superior": (1.0, 1.0, 1.0),
    "ras": (1.0, 1.0, 1.0),
    "left-posterior-superior": (-1.0, -1.0, 1.0),
    "lps": (-1.0, -1.0, 1.0),
    "left-anterior-superior": (-1.0, 1.0, 1.0),
    "las": (-1.0, 1.0, 1.0),
}


def _load_nrrd(path: Path, slice_axis, frame, modality, dtype) -> Volume:
    import nrrd

    try:
        array, header = nrrd.read(str(path))
    except Exception as err:
        raise _wrap(path, "NRRD", err) from err
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
        array = _select_frame(path, array, frame, non_spatial[0])
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
            _closest_to_z(affine),
            "the voxel axis closest to the scanner's z (space directions)",
        )
    else:
        spacings = header.get("spacings")
        if spacings is not None and len(spacings) == 3 and np.all(np.isfinite(spacings)):
            affine[:3, :3] = np.diag(np.asarray(spacings, dtype=np.float64))
        default_axis, reason = 2, "the last axis (the NRRD has no space directions)"
    return _finish(
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


def _from_array(source, array: np.ndarray, slice_axis, spacing, modality, dtype) -> Volume:
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3:
        raise VolumeError(
            source, f"an array volume must be [D, H, W] (or one [H, W] slice), got shape {tuple(array.shape)}"
        )
    # The caller's spacing is given in the array's own axis order, like the array.
    affine = _array_affine(_check_spacing(source, spacing))
    return _finish(
        source,
        array,
        affine,
        slice_axis=slice_axis,
        default_axis=0,
        default_reason="axis 0 (arrays are taken as [D, H, W])",
        reverse_in_plane=False,
        modality=modality,
        dtype=dtype,
    )


def _load_numpy(path: Path, slice_axis, spacing, modality, dtype, key) -> Volume:
    try:
        if _suffix(path) == ".npy":
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
                        raise VolumeError(path, f"holds several arrays {names}: pass key=")
                    chosen = preferred[0]
                array = archive[chosen]
    except VolumeError:
        raise
    except MemoryError:
        raise
    except Exception as err:
        raise _wrap(path, "numpy data", err) from err
    return _from_array(path, array, slice_axis, spacing, modality, dtype)


# --------------------------------------------------------------------------------------------- DICOM
def _floats(value) -> list[float] | None:
    if value is None:
        return None
    try:
        return [
            float(v)
            for v in (value if isinstance(value, Sequence) and not isinstance(value, str) else [value])
        ]
    except (TypeError, ValueError):
        return None


def _group_value(ds, frame_index: int | None, sequence: str, keyword: str):
    """A value from an enhanced multi-frame functional group (per-frame first, then shared), else the
    top-level attribute: the places DICOM allows for it."""
    places = []
    if frame_index is not None and "PerFrameFunctionalGroupsSequence" in ds:
        frames = ds.PerFrameFunctionalGroupsSequence
        if frame_index < len(frames):
            places.append(frames[frame_index])
    if "SharedFunctionalGroupsSequence" in ds and len(ds.SharedFunctionalGroupsSequence):
        places.append(ds.SharedFunctionalGroupsSequence[0])
    for group in places:
        items = group.get(sequence)
        if items is not None and len(items) and keyword in items[0]:
            return items[0].get(keyword)
    return ds.get(keyword)


def _rescale(ds, frame_index: int | None) -> tuple[float, float]:
    slope = _floats(_group_value(ds, frame_index, "PixelValueTransformationSequence", "RescaleSlope"))
    intercept = _floats(_group_value(ds, frame_index, "PixelValueTransformationSequence", "RescaleIntercept"))
    scale = slope[0] if slope else 1.0
    offset = intercept[0] if intercept else 0.0
    dose = _floats(ds.get("DoseGridScaling"))
    if dose:
        scale *= dose[0]
    return scale, offset


def _window_hint(ds, frame_index: int | None = None) -> tuple[float, float] | None:
    center = _floats(_group_value(ds, frame_index, "FrameVOILUTSequence", "WindowCenter"))
    width = _floats(_group_value(ds, frame_index, "FrameVOILUTSequence", "WindowWidth"))
    if center and width and width[0] > 0:
        return float(center[0]), float(width[0])
    return None


def _dicom_modality(ds, modality) -> str | None:
    if modality is not None:
        return modality
    value = str(ds.get("Modality", "") or "").strip().upper()
    return value or None


def _dicom_affine(origin, row_cosine, column_cosine, normal, spacing) -> np.ndarray:
    """LPS geometry of a [slice, row, column] array -> RAS+ affine."""
    slice_step, row_step, column_step = spacing
    affine = np.eye(4)
    affine[:3, 0] = normal * slice_step
    affine[:3, 1] = column_cosine * row_step
    affine[:3, 2] = row_cosine * column_step
    affine[:3, 3] = origin
    affine[:2] *= -1.0
    return affine


def _pixel_spacing(ds, frame_index: int | None) -> tuple[float, float]:
    value = _floats(_group_value(ds, frame_index, "PixelMeasuresSequence", "PixelSpacing"))
    if value and len(value) == 2 and all(v > 0 for v in value):
        return value[0], value[1]
    return 1.0, 1.0


def _fallback_slice_step(ds, frame_index: int | None) -> float:
    for keyword in ("SpacingBetweenSlices", "SliceThickness"):
        value = _floats(_group_value(ds, frame_index, "PixelMeasuresSequence", keyword))
        if value and value[0] > 0:
            return value[0]
    return 1.0


def _sorted_positions(source, positions: np.ndarray, normal: np.ndarray, labels: list[str]):
    """Order slices along the normal; return (order, origin, slice step, notes)."""
    projection = positions @ normal
    order = np.argsort(projection, kind="stable")
    ordered = projection[order]
    steps = np.diff(ordered)
    if steps.size and np.any(steps < 1e-4):
        duplicate = int(np.argmax(steps < 1e-4))
        raise VolumeError(
            source,
            f"{labels[order[duplicate]]} and {labels[order[duplicate + 1]]} lie at the same slice position "
            f"({ordered[duplicate]:.3f} mm): several echoes, phases or time points mixed in one series",
        )
    notes = []
    if steps.size:
        step = float(np.median(steps))
        if np.max(np.abs(steps - step)) > 0.01 * step + 1e-3:
            notes.append(
                f"uneven slice spacing ({steps.min():.3f}..{steps.max():.3f} mm); "
                f"using the median {step:.3f} mm"
            )
    else:
        step = 0.0
    return order, positions[order[0]], step, notes


def _orientation(source, value) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    cosines = _floats(value)
    if not cosines:
        return None
    if len(cosines) != 6:
        raise VolumeError(source, f"ImageOrientationPatient must hold 6 numbers, got {cosines}")
    row_cosine, column_cosine = np.asarray(cosines[:3]), np.asarray(cosines[3:])
    normal = np.cross(row_cosine, column_cosine)
    if np.linalg.norm(normal) < 1e-3:
        raise VolumeError(source, f"ImageOrientationPatient {cosines} has parallel row and column directions")
    return row_cosine, column_cosine, normal / np.linalg.norm(normal)


def _pixels(path, ds) -> np.ndarray:
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        raise VolumeError(
            path, f"colour DICOM ({ds.get('PhotometricInterpretation')}) is not a grey-level volume"
        )
    try:
        return ds.pixel_array
    except MemoryError:
        raise
    except Exception as err:
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(syntax, "name", syntax)
        raise _wrap(path, f"DICOM pixel data (transfer syntax {name})", err) from err


def _read_dicom(path: Path, *, headers_only: bool):
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(str(path), stop_before_pixels=headers_only)
    except InvalidDicomError:
        raise
    except MemoryError:
        raise
    except Exception as err:
        raise _wrap(path, "DICOM", err) from err


def _load_dicom_file(path: Path, slice_axis, modality, dtype) -> Volume:
    from pydicom.errors import InvalidDicomError

    try:
        ds = _read_dicom(path, headers_only=False)
    except InvalidDicomError as err:
        raise VolumeError(path, f"not a DICOM file ({err})") from err
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise VolumeError(path, "DICOM file has no pixel data")
    pixels = _pixels(path, ds)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames == 1:
        pixels = pixels[None]
    if pixels.ndim != 3:
        raise VolumeError(path, f"unexpected DICOM pixel array shape {tuple(pixels.shape)}")

    rescales = [_rescale(ds, i if frames > 1 else None) for i in range(frames)]
    labels = [f"{path.name} frame {i}" for i in range(frames)]
    orientation = _orientation(
        path,
        _group_value(ds, 0 if frames > 1 else None, "PlaneOrientationSequence", "ImageOrientationPatient"),
    )
    positions = [
        _floats(_group_value(ds, i if frames > 1 else None, "PlanePositionSequence", "ImagePositionPatient"))
        for i in range(frames)
    ]
    offsets = _floats(ds.get("GridFrameOffsetVector"))
    notes = []
    order = np.arange(frames)
    if orientation is not None and frames > 1:
        for i in range(1, frames):
            other = _orientation(
                path, _group_value(ds, i, "PlaneOrientationSequence", "ImageOrientationPatient")
            )
            if other is not None and not np.allclose(
                np.concatenate(other[:2]), np.concatenate(orientation[:2]), atol=_ORIENTATION_ATOL
            ):
                raise VolumeError(
                    path, f"frames 0 and {i} have different orientations (ImageOrientationPatient)"
                )
    if (
        orientation is not None
        and all(p is not None and len(p) == 3 for p in positions)
        and frames > 1
        and len({tuple(p) for p in positions}) > 1
    ):
        order, origin, step, notes = _sorted_positions(path, np.asarray(positions), orientation[2], labels)
    elif (
        orientation is not None
        and positions[0] is not None
        and offsets is not None
        and len(offsets) == frames
    ):
        # RT dose grids: one position plus offsets along the normal.
        grid = np.asarray(positions[0])[None] + np.asarray(offsets)[:, None] * orientation[2][None]
        order, origin, step, notes = _sorted_positions(path, grid, orientation[2], labels)
    else:
        origin = (
            np.asarray(positions[0]) if positions[0] is not None and len(positions[0]) == 3 else np.zeros(3)
        )
        step = _fallback_slice_step(ds, 0 if frames > 1 else None)
        if frames > 1:
            notes.append("frames have no per-frame positions; kept in file order")
    if frames == 1 or step == 0.0:
        step = _fallback_slice_step(ds, 0 if frames > 1 else None)
    if orientation is None:
        orientation = (np.array([1.0, 0, 0]), np.array([0, 1.0, 0]), np.array([0, 0, 1.0]))
        notes.append("no ImageOrientationPatient; assuming axial")

    needs_rescale = any(r != (1.0, 0.0) for r in rescales)
    volume = pixels[order]
    if needs_rescale:
        volume = volume.astype(np.float32)
        for out_index, frame_index in enumerate(order):
            scale, offset = rescales[frame_index]
            volume[out_index] *= np.float32(scale)
            volume[out_index] += np.float32(offset)
    row_step, column_step = _pixel_spacing(ds, 0 if frames > 1 else None)
    affine = _dicom_affine(
        origin, orientation[0], orientation[1], orientation[2], (step, row_step, column_step)
    )
    return _finish(
        path,
        volume,
        affine,
        slice_axis=slice_axis,
        default_axis=0,
        default_reason="the frame axis of the DICOM file (acquisition order)",
        reverse_in_plane=False,
        modality=_dicom_modality(ds, modality),
        dtype=dtype,
        window_hint=_window_hint(ds, 0 if frames > 1 else None),
        notes=notes,
    )


def _dicom_candidates(folder: Path) -> list[Path]:
    files = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith(".") or not entry.is_file() or entry.name.upper() == "DICOMDIR":
            continue
        files.append(entry)
    return files


def _load_dicom_series(folder: Path, slice_axis, modality, dtype) -> Volume:
    from pydicom.errors import InvalidDicomError

    headers = []
    for path in _dicom_candidates(folder):
        if path.stat().st_size == 0:
            raise VolumeError(path, "file is empty")
        try:
            headers.append((path, _read_dicom(path, headers_only=True)))
        except InvalidDicomError:
            # Series folders often carry a README, a thumbnail or a checksum list: not slices.
            continue
    if not headers:
        subfolders = [p.name for p in folder.iterdir() if p.is_dir()]
        hint = f" (it has subfolders {subfolders[:5]}: pass one series folder)" if subfolders else ""
        raise VolumeError(folder, f"no DICOM files in this folder{hint}")
    if len(headers) == 1:
        return _load_dicom_file(headers[0][0], slice_axis, modality, dtype)

    first_path, first = headers[0]
    multi = [p.name for p, ds in headers if int(ds.get("NumberOfFrames", 1) or 1) > 1]
    if multi:
        raise VolumeError(
            folder, f"holds multi-frame files {multi[:3]} next to other files: load each file on its own"
        )
    series = {str(ds.get("SeriesInstanceUID", "")) for _, ds in headers}
    if len(series) > 1:
        raise VolumeError(
            folder, f"mixes {len(series)} series (different SeriesInstanceUID): put one series per folder"
        )
    shape = (first.get("Rows"), first.get("Columns"))
    orientation = _orientation(first_path, first.get("ImageOrientationPatient"))
    for path, ds in headers[1:]:
        if (ds.get("Rows"), ds.get("Columns")) != shape:
            raise VolumeError(
                folder,
                f"slices of different sizes: {first_path.name} is {shape[0]}x{shape[1]}, "
                f"{path.name} is {ds.get('Rows')}x{ds.get('Columns')}",
            )
        other = _orientation(path, ds.get("ImageOrientationPatient"))
        if (other is None) != (orientation is None) or (
            other is not None
            and not np.allclose(
                np.concatenate(other[:2]), np.concatenate(orientation[:2]), atol=_ORIENTATION_ATOL
            )
        ):
            raise VolumeError(
                folder, f"slices with different orientations: {first_path.name} and {path.name}"
            )

    labels = [p.name for p, _ in headers]
    positions = [_floats(ds.get("ImagePositionPatient")) for _, ds in headers]
    notes = []
    if orientation is not None and all(p is not None and len(p) == 3 for p in positions):
        order, origin, step, notes = _sorted_positions(folder, np.asarray(positions), orientation[2], labels)
    else:
        numbers = [ds.get("InstanceNumber") for _, ds in headers]
        if any(n is None for n in numbers):
            raise VolumeError(
                folder, "slices have neither ImagePositionPatient nor InstanceNumber: cannot order them"
            )
        order = np.argsort(np.asarray([int(n) for n in numbers]), kind="stable")
        origin, step = np.zeros(3), 0.0
        notes.append("no slice positions; ordered by InstanceNumber")
    if orientation is None:
        orientation = (np.array([1.0, 0, 0]), np.array([0, 1.0, 0]), np.array([0, 0, 1.0]))
        notes.append("no ImageOrientationPatient; assuming axial")
    if step == 0.0:
        step = _fallback_slice_step(first, None)

    rescales = [_rescale(ds, None) for _, ds in headers]
    needs_rescale = any(r != (1.0, 0.0) for r in rescales)
    volume = None
    for out_index, index in enumerate(order):
        path = headers[index][0]
        ds = _read_dicom(path, headers_only=False)
        pixels = _pixels(path, ds)
        if pixels.shape != tuple(shape):
            raise VolumeError(path, f"pixel data of shape {tuple(pixels.shape)}, header says {shape}")
        if volume is None:
            volume = np.empty((len(order), *shape), dtype=np.float32 if needs_rescale else pixels.dtype)
        if needs_rescale:
            scale, offset = rescales[index]
            volume[out_index] = pixels.astype(np.float32) * np.float32(scale) + np.float32(offset)
        else:
            volume[out_index] = pixels
    row_step, column_step = _pixel_spacing(first, None)
    affine = _dicom_affine(
        np.asarray(origin), orientation[0], orientation[1], orientation[2], (step, row_step, column_step)
    )
    return _finish(
        folder,
        volume,
        affine,
        slice_axis=slice_axis,
        default_axis=0,
        default_reason="the series' slice normal (files sorted by ImagePositionPatient)",
        reverse_in_plane=False,
        modality=_dicom_modality(first, modality),
        dtype=dtype,
        window_hint=_window_hint(first),
        notes=notes,
    )


# -------------------------------------------------------------------------------------------- public
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
        return _from_array(None, source, slice_axis, spacing, modality, dtype)
    if type(source).__module__.startswith("torch"):
        import torch

        if isinstance(source, torch.Tensor):
            tensor = source.detach().cpu()
            if tensor.dtype in (torch.bfloat16, torch.float16):
                tensor = tensor.float()
            return _from_array(None, tensor.numpy(), slice_axis, spacing, modality, dtype)
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(
            f"load_volume: source must be a path, numpy array or torch tensor, got {type(source).__name__}"
        )

    path = Path(source)
    if not path.exists():
        raise VolumeError(path, "no such file or folder")
    if path.is_dir():
        return _load_dicom_series(path, slice_axis, modality, dtype)
    if path.stat().st_size == 0:
        raise VolumeError(path, "file is empty")
    suffix = _suffix(path)
    if suffix in NIBABEL_SUFFIXES:
        return _load_nibabel(path, slice_axis, frame, modality, dtype)
    if suffix in NRRD_SUFFIXES:
        return _load_nrrd(path, slice_axis, frame, modality, dtype)
    if suffix in NUMPY_SUFFIXES:
        return _load_numpy(path, slice_axis, spacing, modality, dtype, key)
    if suffix in DICOM_SUFFIXES or _looks_like_dicom(path):
        return _load_dicom_file(path, slice_axis, modality, dtype)
    raise VolumeError(
        path,
        f"unsupported format {suffix or '(no extension)'!r}; supported: {', '.join(SUPPORTED_SUFFIXES)}, "
        "DICOM files and DICOM series folders",
    )


# --------------------------------------------------------------------------------------- intensities
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
        else:
            out.update(low_percentile=self.low, high_percentile=self.high)
        return out


def _ct_window(name: str, level: float, width: float) -> Window:
    if not (math.isfinite(level) and math.isfinite(width)) or width <= 0:
        raise ValueError(f"window: level must be finite and width positive, got level={level}, width={width}")
    return Window("ct", name, level=float(level), width=float(width))


def resolve_window(window, volume: Volume | None = None) -> Window:
    """Turn a window spec into a :class:`Window`.

    ``window``: a preset name (``abdomen``, ``lung``, ``bone``, ``brain``, ``mediastinum``), ``"L,W"``
    or a ``(level, width)`` pair in HU, ``"percentile"`` (MRI-style, 0.5..99.5), or ``"auto"``: for CT
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
        f"window: unknown {window!r}; use one of {sorted(CT_WINDOWS)}, 'L,W' (HU), 'percentile' or 'auto'"
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
    sample = _sample(array).astype(np.float64)
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
    return scale_percentile(data, window.low, window.high)


def normalize(volume, window="auto") -> tuple[np.ndarray, Window]:
    """A volume's slices in [0, 1] (float32 ``[D, H, W]``) and the window that was used.

    ``volume``: a :class:`Volume` (``auto`` then looks at its modality) or an array.
    """
    if isinstance(volume, Volume):
        chosen = resolve_window(window, volume)
        return apply_window(volume.data, chosen), chosen
    chosen = resolve_window(window, None)
    return apply_window(volume, chosen), chosen


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
