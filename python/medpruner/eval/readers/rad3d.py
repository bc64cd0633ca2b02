"""3D-RAD as released (GitHub ``Tang-xiaoxiao/3D-RAD`` and Hugging Face ``Tang-xiaoxiao/3D-RAD``: the
``3DRAD/{train,test}/Task*/`` folders and their CSVs; volumes as the repository's ``RADDataset`` finds
them, through a ``VolumeName -> Path`` table).

Layout::

    3DRAD/                                  the release folder: pass it as --data (or one split folder)
        test/                               --split test (default) | train
            Task1_Image_Observation/        Anatomical_observation.csv  Pathological_observation.csv
            Task2_Anomaly_Detection/        Abnormality_feature.csv ...
            Task3_Medical_Computation/      Diameter.csv  Size.csv  Thickness.csv
            Task4_Existence_Detection/      "Lung nodule.csv" ... (one per finding)
            Task5_Static_Temporal_Diagnosis/        b.csv ... (one per scan series)
            Task6_Longitudinal_Temporal_Diagnosis/  b.csv ...

Every CSV has ``Task,Subtask,VolumeName,Question,Answer,QuestionType,AnswerChoice,Choice A..D``.
``QuestionType`` is ``Open`` (tasks 1-3: AnswerChoice and every Choice are ``-``) or ``Close`` (task 4:
Yes / No and ``-`` for C and D; tasks 5-6: four options). Placeholders (``-``, empty, NaN) are not
options. The category is the subtask, ``<task folder>/<CSV name>``; ``--subtask`` keeps the rows whose
task folder (``Task4_Existence_Detection``, ``Task4``, ``4``), CSV name (``Lung nodule``) or both
(``Task4_Existence_Detection/Lung nodule``) match one of its comma-separated terms.

Volumes (``VolumeName`` such as ``test_1016_d_2.nii.gz``, a renamed CT-RATE series) are not in the
repository. ``--volumes`` is a folder that holds them under their names, either directly or in CT-RATE's
nesting ``<split>_<id>/<split>_<id>_<series>/<VolumeName>``, or a CSV with the columns ``VolumeName``
and ``Path`` (the repository's ``valid_path.csv``; relative paths are taken from the CSV's folder).
Default: the release folder. A name that does not resolve is a skipped row.
"""

from __future__ import annotations

import re
from pathlib import Path

from medpruner.eval.readers.base import (
    MISSING_VOLUME,
    DatasetError,
    ReadRequest,
    Release,
    RowError,
    VolumeRef,
    column_options,
    letter_field,
    read_csv_rows,
    text_field,
)

SPLITS = ("test", "train")
COLUMNS = ("Task", "Subtask", "VolumeName", "Question", "Answer", "QuestionType", "AnswerChoice",
           "Choice A", "Choice B", "Choice C", "Choice D")
_TASK_FOLDER = re.compile(r"^Task(\d+)(?:_|$)", re.IGNORECASE)
_CT_RATE_NAME = re.compile(r"^([A-Za-z]+_\d+)_([A-Za-z0-9]+)_")


def _split_folder(path: Path, split: str) -> Path:
    if split not in SPLITS:
        raise ValueError(f"split: 3D-RAD ships {', '.join(SPLITS)}, got {split!r}")
    if not path.is_dir():
        raise DatasetError(path, None, "no such file or folder")
    if (path / split).is_dir():
        return path / split
    if any(_TASK_FOLDER.match(p.name) and p.is_dir() for p in path.iterdir()):
        return path
    raise DatasetError(path, None, f"no 3D-RAD {split} split here: expected {split}/Task*/ folders or Task*/ "
                                   f"folders; the folder holds {sorted(p.name for p in path.iterdir())[:12]}")


def _matches(terms: list[str], task: str, name: str) -> bool:
    number = _TASK_FOLDER.match(task)
    keys = {task.lower(), name.lower(), f"{task}/{name}".lower()}
    if number:
        keys |= {number.group(1), f"task{number.group(1)}"}
    return any(term.lower() in keys for term in terms)


def _subtask_files(folder: Path, subtask: str | None) -> list[Path]:
    files = sorted((csv for task in folder.iterdir() if task.is_dir() and _TASK_FOLDER.match(task.name)
                    for csv in task.glob("*.csv")),
                   key=lambda p: (int(_TASK_FOLDER.match(p.parent.name).group(1)), p.stem.lower()))
    if not files:
        raise DatasetError(folder, None, "no CSV under Task*/ folders")
    if subtask is None:
        return files
    terms = [t.strip() for t in subtask.split(",") if t.strip()]
    chosen = [f for f in files if _matches(terms, f.parent.name, f.stem)]
    if not chosen:
        names = sorted({f.parent.name for f in files})
        raise DatasetError(folder, None, f"--subtask {subtask!r} matches no task or subtask; tasks: {names}")
    return chosen


class _VolumeTable:
    """VolumeName -> path: a folder (flat or CT-RATE nesting) or a ``VolumeName,Path`` CSV."""

    def __init__(self, root: Path):
        self.root = root
        self.table: dict[str, Path] | None = None
        if root.is_file():
            self.table = {}
            for _, row in read_csv_rows(root, ("VolumeName", "Path")):
                path = Path(text_field(row, "Path"))
                self.table[text_field(row, "VolumeName")] = path if path.is_absolute() else root.parent / path

    def resolve(self, name: str) -> Path:
        if self.table is not None:
            if name not in self.table:
                raise RowError(f"{name!r} is not in the volume table {self.root}", MISSING_VOLUME)
            tried = [self.table[name]]
        else:
            tried = [self.root / name]
            nested = _CT_RATE_NAME.match(name)
            if nested:
                case = nested.group(1)
                tried.append(self.root / case / f"{case}_{nested.group(2)}" / name)
        for path in tried:
            if path.exists():
                return path
        raise RowError(f"{name!r} not found: tried {', '.join(repr(str(p)) for p in tried)} (--volumes names the "
                       "folder holding the volumes, or a VolumeName,Path CSV)", MISSING_VOLUME)


def read(request: ReadRequest) -> Release:
    if request.path.is_file():
        files, split = [request.path], None
    else:
        folder = _split_folder(request.path, request.split)
        files, split = _subtask_files(folder, request.subtask), request.split
    volumes = request.volumes if request.volumes is not None else (
        request.path.parent if request.path.is_file() else request.path)
    table = _VolumeTable(volumes)

    def rows():
        for path in files:
            task = path.parent.name
            for row_name, row in read_csv_rows(path, COLUMNS):
                def build(row=row, row_name=row_name, path=path, task=task):
                    question, answer = text_field(row, "Question"), text_field(row, "Answer")
                    kind = text_field(row, "QuestionType").lower()
                    options, letter = {}, None
                    if kind in ("close", "closed"):
                        options = column_options(row)
                        if len(options) < 2:
                            raise RowError(f"a Close question with fewer than two options: {sorted(options)}")
                        letter = letter_field(text_field(row, "AnswerChoice"), options)
                    elif kind != "open":
                        raise RowError(f"QuestionType must be Close or Open, got {kind!r}")
                    volume = table.resolve(text_field(row, "VolumeName"))
                    category = f"{task}/{path.stem}" if _TASK_FOLDER.match(task) else path.stem
                    return dict(sample_id=f"{category}:{row_name.split()[-1]}", question=question,
                                answer=answer, category=category, volume=VolumeRef(path=volume),
                                options=options, answer_letter=letter,
                                extra={"task": text_field(row, "Task", required=False),
                                       "subtask": text_field(row, "Subtask", required=False)})

                yield path, row_name, build

    return Release(files, volumes, rows(), split)
