"""What every loader shares: :class:`Volume`, :class:`VolumeError`, the voxel-to-patient geometry, the
CT/MR guess, and :func:`finish_volume`, which checks a loaded array and puts its slice axis first."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# Air is -1000 HU; scanners pad outside the field of view with -1024 or lower. A volume with a
# noticeable share of such values is CT; MRI intensities are non-negative or only slightly negative.
_CT_AIR_HU = -900.0
_CT_AIR_FRACTION = 0.01
# Percentiles and the modality guess look at most this many voxels (a regular subsample beyond).
_SAMPLE_VOXELS = 1 << 22


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
    # What the file does not record and the loader filled in ("modality" guessed from the intensities,
    # "spacing" and "orientation" of an array taken as 1 mm RAS): reports show these as assumed.
    assumed: list[str] = field(default_factory=list)
    # Set by :func:`medpruner.volume.normalize`: the NaN/Inf voxels it replaced and how (None: none).
    nonfinite: dict | None = None
    # Set by :func:`medpruner.volume.normalize`: the single value of a constant volume (None otherwise).
    constant_value: float | None = None

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
            "assumed": list(self.assumed),
            "nonfinite": self.nonfinite,
            "constant": self.constant_value is not None,
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


def closest_to_z(affine: np.ndarray) -> int:
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
def sample_voxels(data: np.ndarray) -> np.ndarray:
    flat = np.asarray(data).reshape(-1)
    step = max(1, math.ceil(flat.size / _SAMPLE_VOXELS))
    return flat[::step]


def guess_modality(data: np.ndarray) -> str:
    """ "CT" when at least 1% of the finite voxels are at or below -900 (air in Hounsfield units), else
    "MR". NaN and Inf are left out: a -Inf slice does not make a volume look like CT."""
    sample = sample_voxels(data)
    signed = np.issubdtype(sample.dtype, np.signedinteger) or np.issubdtype(sample.dtype, np.floating)
    if np.issubdtype(sample.dtype, np.floating):
        sample = sample[np.isfinite(sample)]
    if sample.size == 0 or not signed:
        return "MR"
    return "CT" if np.count_nonzero(sample <= _CT_AIR_HU) >= _CT_AIR_FRACTION * sample.size else "MR"


# ------------------------------------------------------------------------------ shared by the loaders
def file_suffix(path: Path) -> str:
    name = path.name.lower()
    for suffix in (".nii.gz",):
        if name.endswith(suffix):
            return suffix
    return path.suffix.lower()


def read_error(path, what: str, err: BaseException) -> VolumeError:
    detail = str(err) or type(err).__name__
    return VolumeError(path, f"cannot read {what} ({type(err).__name__}: {detail})")


def finish_volume(
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
    assumed=(),
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
        assumed=[*([] if modality else ["modality"]), *assumed],
        source=None if source is None else str(source),
        slice_axis=axis,
        slice_axis_reason=reason,
        window_hint=window_hint,
        notes=list(notes),
    )


def frame_message(frames: int, shape: tuple) -> str:
    """The error of a 4D image read without a frame: names the CLI option and the Python argument."""
    return (
        f"4D image with {frames} frames (shape {shape}): choose one with --frame N "
        f"(Python: load_volume(..., frame=N)), N in 0..{frames - 1}"
    )


def select_frame(path, array: np.ndarray, frame: int | None, frame_axis: int) -> np.ndarray:
    frames = array.shape[frame_axis]
    if frame is None:
        if frames == 1:
            return np.take(array, 0, axis=frame_axis)
        raise VolumeError(path, frame_message(frames, tuple(array.shape)))
    if isinstance(frame, bool) or not isinstance(frame, (int, np.integer)) or not 0 <= frame < frames:
        raise VolumeError(path, f"frame must be an int in [0, {frames}), got {frame!r}")
    return np.take(array, int(frame), axis=frame_axis)
