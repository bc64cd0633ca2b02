"""Medical volumes as ``[D, H, W]`` slice stacks: loading, orientation, CT windowing, intensity scaling.

Every loader returns a :class:`Volume` whose ``data`` is ``[D, H, W]`` with ``D`` the slice axis (the
acquisition axis unless the caller picks another one), plus the geometry needed to place it in the
patient: per-axis spacing in mm and a 4x4 affine from ``(d, h, w)`` voxel indices to RAS+ millimetres
(the NIfTI convention; DICOM's LPS positions are converted).

Intensities: IAF and the models work on slices scaled to [0, 1] (CT through a Hounsfield window, MRI
through percentiles) and then to the processors' [-1, 1] (mean = std = 0.5). ``gamma`` always means a
mean absolute difference on that [-1, 1] scale (DESIGN.md); :func:`gamma_for_unit_range` gives the
threshold that means the same on [0, 1] slices.

Formats: NIfTI-1/2 and MGH (nibabel, :mod:`.nifti`), DICOM series folders and single (multi-frame)
DICOM files (pydicom, :mod:`.dicom`), NRRD (pynrrd, :mod:`.nrrd`), ``.npy``/``.npz``, numpy arrays
and torch tensors (:mod:`.numpy`); :mod:`.load` picks among them and :mod:`.windowing` scales
intensities. The format libraries are imported only when a file of their kind is loaded.
"""

from __future__ import annotations

# The names without a place in __all__ are imported as NAME as NAME: they stay importable from here, as
# they were before the split.
from medpruner.volume.base import Volume, VolumeError
from medpruner.volume.base import axis_codes as axis_codes
from medpruner.volume.base import guess_modality as guess_modality
from medpruner.volume.dicom import DICOM_SUFFIXES as DICOM_SUFFIXES
from medpruner.volume.load import SUPPORTED_SUFFIXES, load_volume
from medpruner.volume.nifti import NIBABEL_SUFFIXES as NIBABEL_SUFFIXES
from medpruner.volume.nrrd import NRRD_SUFFIXES as NRRD_SUFFIXES
from medpruner.volume.numpy import NUMPY_SUFFIXES as NUMPY_SUFFIXES
from medpruner.volume.windowing import (
    CT_WINDOWS,
    Window,
    apply_window,
    from_model_range,
    gamma_for_unit_range,
    normalize,
    resolve_window,
    scale_percentile,
    to_model_range,
    window_ct,
)
from medpruner.volume.windowing import DEFAULT_PERCENTILES as DEFAULT_PERCENTILES
from medpruner.volume.windowing import NONFINITE_POLICY as NONFINITE_POLICY
from medpruner.volume.windowing import replace_nonfinite as replace_nonfinite

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
