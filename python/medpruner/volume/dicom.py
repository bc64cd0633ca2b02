"""DICOM through pydicom (imported only when a DICOM is loaded): single and enhanced multi-frame files,
and series folders sorted along the slice normal. Compressed transfer syntaxes decode through
pydicom's plugins: the ``volume`` extra installs pylibjpeg with its libjpeg (JPEG baseline, extended
and lossless, Process 14 included) and openjpeg (JPEG 2000) decoders."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medpruner.volume.base import Volume, VolumeError, finish_volume, read_error

DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
# Tolerance on direction cosines when deciding that two DICOM files share an orientation.
_ORIENTATION_ATOL = 1e-4


def looks_like_dicom(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


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
        raise read_error(path, f"DICOM pixel data (transfer syntax {name})", err) from err


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
        raise read_error(path, "DICOM", err) from err


def load_dicom_file(path: Path, slice_axis, modality, dtype) -> Volume:
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
    return finish_volume(
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


def load_dicom_series(folder: Path, slice_axis, modality, dtype) -> Volume:
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
        return load_dicom_file(headers[0][0], slice_axis, modality, dtype)

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
    return finish_volume(
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
