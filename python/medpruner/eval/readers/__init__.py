"""Readers for local copies of 3D medical VQA and report-generation releases, laid out as published
(nothing is downloaded). One module per release; each docstring gives the layout it reads and the public
source it was read from.

Every reader returns a :class:`Dataset`: the :class:`Sample` rows it could read and, for every row it
could not, a :class:`Skip` naming the file, the row, the reason (a missing volume, a malformed row, an
unsupported question type) and the detail, such as the path tried (``on_error="skip"``, the default;
counted in :meth:`Dataset.summary`, never dropped silently), or a :class:`DatasetError` naming the file
and the row (``on_error="raise"``). Volume paths resolve exactly as the release means them, relative to
the volumes root: a path that does not resolve is a skipped row, never a search by file name (series
names repeat across cases). Volumes are opened only when :meth:`Sample.load` is called.

Formats:

``m3d``        M3D-VQA (:mod:`.m3d`): the release folder of CSVs, ``--split`` picks the file
``3drad``      3D-RAD (:mod:`.rad3d`): ``{train,test}/Task*/*.csv``, the subtask as the category
``deeptumor``  DeepTumorVQA (:mod:`.deeptumor`): ``benchmark/test_qa.json``, options from ``mc_question``
``hulumed``    the MedPruner / Hulu-Med evaluation JSON (:mod:`.medunieval`): ``M3D_test.json``,
               ``Rad3D_test.json``
``amos``       AMOS-MM report generation (:mod:`.medunieval`): ``amos_val_mrg_sft.json``
``jsonl``      one JSON object a line (:mod:`.jsonl`)
"""

from __future__ import annotations

from pathlib import Path

from medpruner.eval.readers import deeptumor, jsonl, m3d, medunieval, rad3d
from medpruner.eval.readers.base import (
    SKIP_REASONS,
    Dataset,
    DatasetError,
    ReadRequest,
    RowError,
    Sample,
    Skip,
    VolumeRef,
)

__all__ = ["FORMATS", "SKIP_REASONS", "Dataset", "DatasetError", "Sample", "Skip", "VolumeRef", "read_dataset"]

_READERS = {
    "m3d": m3d.read,
    "3drad": rad3d.read,
    "deeptumor": deeptumor.read,
    "hulumed": medunieval.read_vqa,
    "amos": medunieval.read_reports,
    "jsonl": jsonl.read,
}
FORMATS = tuple(_READERS)
DEFAULT_SPLIT = "test"


def read_dataset(path, format: str, *, split: str = DEFAULT_SPLIT, subtask: str | None = None, volumes=None,
                 on_error: str = "skip", mode: str = "closed") -> Dataset:
    """Read a local release (or one of its data files).

    Args:
        path: the release folder as published (M3D-VQA's CSV folder, 3D-RAD's ``3DRAD``, DeepTumorVQA's
            root, a MedUniEval dataset folder), or a data file of the format.
        format: one of :data:`FORMATS`.
        split: which split's file a release folder gives (default "test"; M3D-VQA also val, train,
            test5k, yn_train; 3D-RAD train). Ignored when ``path`` is a file.
        subtask: 3D-RAD only: comma-separated tasks or subtasks to keep (see :mod:`.rad3d`).
        volumes: the root the volume paths are relative to (default: the release's own, see each
            format); 3D-RAD also takes a ``VolumeName,Path`` CSV.
        on_error: "skip" (count the row in the summary) or "raise" (DatasetError naming file and row).
        mode: M3D-VQA and DeepTumorVQA: "closed" (multiple choice) or "open".
    """
    if format not in _READERS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if on_error not in ("skip", "raise"):
        raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
    if subtask is not None and format != "3drad":
        raise ValueError(f"subtask: only the 3drad format has subtasks, got format {format!r}")
    path = Path(path)
    if not path.exists():
        raise DatasetError(path, None, "no such file or folder")
    request = ReadRequest(path=path, split=split, subtask=subtask,
                          volumes=None if volumes is None else Path(volumes), mode=mode)
    release = _READERS[format](request)
    samples, skipped, rows = [], [], 0
    for file, row_name, build in release.rows:
        rows += 1
        try:
            fields = build()
        except RowError as err:
            if on_error == "raise":
                raise DatasetError(file, row_name, f"{err.kind}: {err}") from None
            skipped.append(Skip(str(file), row_name, err.kind, str(err)))
            continue
        samples.append(Sample(source=f"{file}: {row_name}", **fields))
    return Dataset(format, path, samples, rows, skipped, files=release.files,
                   split=None if path.is_file() else release.split, volumes=release.volumes)
