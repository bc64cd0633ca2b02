"""Readers for local copies of 3D medical VQA datasets (nothing is downloaded).

Every reader returns a :class:`Dataset`: the :class:`Sample` rows it could read and, for every row it
could not, the row and the reason (``on_error="skip"``, the default: counted in :meth:`Dataset.summary`,
never dropped silently) or a :class:`DatasetError` naming the file and the row (``on_error="raise"``).
A row is malformed when a required field is missing or empty, or when its volume file is missing;
volumes are opened only when :meth:`Sample.load` is called.

Formats (``volumes``: the folder the volume paths are relative to; default the data file's folder):

``m3d``        M3D-VQA CSV: Image Path, Question, Choice A-D, Answer, Answer Choice, Question Type;
               volumes ``.npy`` ``1 x 32 x 256 x 256`` already in [0, 1]. ``mode="closed"`` (default)
               gives the multiple-choice questions, ``mode="open"`` the same rows without choices.
``3drad``      3D-RAD CSV: Task, Subtask, VolumeName (``.nii.gz``, found under ``volumes``, in
               sub-folders too), Question, Answer, QuestionType (closed/open), AnswerChoice, Choice A-D;
               category: the Task.
``deeptumor``  DeepTumorVQA JSON (a list, or ``{"questions": [...]}``): qid, image_id, question, answer,
               correct_option, question_type; the options come from ``options``/``choices`` when present,
               else from lines "A. ..." of the question; the volume is ``image_id`` (a file with any
               supported suffix, or a folder holding ``ct.nii.gz`` or a DICOM series).
``hulumed``    MedPruner's Hulu-Med style JSON: a list of ``{"id", "image": [slice images] | "folder",
               "conversations": [{"from": "human", "value": "<image>..."}, {"from": "gpt", "value": ...}],
               "category"?, "options"?}``; the slice images are read in list order (a folder: its images
               in natural name order).
``jsonl``      one JSON object a line: ``volume``, ``question``, ``answer``, and optionally ``options``
               (letter -> text, or a list taken as A, B, ...), ``answer_letter``, ``category``, ``id``,
               ``unit_range`` (true: the volume is a ``.npy`` already in [0, 1], read without windowing).
"""

from __future__ import annotations

import csv
import json
import re
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["FORMATS", "Dataset", "DatasetError", "Sample", "VolumeRef", "read_dataset"]

FORMATS = ("m3d", "3drad", "deeptumor", "hulumed", "jsonl")
LETTERS = "ABCDEFGH"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


class DatasetError(ValueError):
    """A dataset row (or file) that cannot be used; the message names the file and the row."""

    def __init__(self, file, row, reason: str):
        self.file, self.row, self.reason = str(file), row, reason
        where = f"{file}: {row}: " if row is not None else f"{file}: "
        super().__init__(where + reason)


@dataclass(frozen=True)
class VolumeRef:
    """Where a sample's volume lives: a volume file or DICOM folder (``path``), or slice images in order
    (``slices``). ``unit_range``: the file already holds [0, 1] intensities (no windowing)."""

    path: Path | None = None
    slices: tuple[Path, ...] = ()
    unit_range: bool = False

    def describe(self) -> str:
        return str(self.path) if self.path is not None else f"{len(self.slices)} slice images"


@dataclass
class Sample:
    """One question about one volume. ``options``: letter -> text (empty for an open-ended question);
    ``answer_letter``: the gold option of a closed question; ``source``: "file: row" for messages."""

    sample_id: str
    question: str
    answer: str
    category: str
    volume: VolumeRef
    source: str
    options: dict[str, str] = field(default_factory=dict)
    answer_letter: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def closed(self) -> bool:
        return bool(self.options) or self.answer_letter is not None

    def load(self, window="auto") -> np.ndarray:
        """The volume as float32 ``[D, H, W]`` in [0, 1] (CT windowed by ``window``, MRI by percentiles,
        as :func:`medpruner.volume.normalize`); DatasetError naming this sample's row on failure."""
        try:
            return _load(self.volume, window)
        except (ValueError, OSError) as err:
            raise DatasetError(self.source, None, f"cannot load volume {self.volume.describe()}: {err}") from err


@dataclass
class Dataset:
    format: str
    file: Path
    samples: list[Sample]
    rows: int
    skipped: list[tuple[str, str]]

    def __len__(self) -> int:
        return len(self.samples)

    def __iter__(self) -> Iterator[Sample]:
        return iter(self.samples)

    def summary(self) -> dict:
        return {
            "format": self.format,
            "file": str(self.file),
            "rows": self.rows,
            "samples": len(self.samples),
            "closed": sum(s.closed for s in self.samples),
            "open": sum(not s.closed for s in self.samples),
            "skipped": len(self.skipped),
            "skipped_rows": [{"row": row, "reason": reason} for row, reason in self.skipped],
            "categories": dict(sorted(Counter(s.category for s in self.samples).items())),
        }


# ---------------------------------------------------------------------------------------- loading
def _load(ref: VolumeRef, window) -> np.ndarray:
    from medpruner.volume import VolumeError, load_volume, normalize

    if ref.slices:
        return _load_slice_images(ref.slices)
    path = ref.path
    if ref.unit_range:
        if not path.exists():
            raise VolumeError(path, "no such file or folder")
        array = np.load(path, mmap_mode="r") if path.suffix == ".npy" else None
        if array is None:
            raise VolumeError(path, "a [0, 1] volume must be a .npy file")
        while array.ndim > 3 and array.shape[0] == 1:
            array = array[0]
        if array.ndim != 3:
            raise VolumeError(path, f"expected [D, H, W] (or [1, D, H, W]), got shape {tuple(array.shape)}")
        return np.clip(np.asarray(array, dtype=np.float32), 0.0, 1.0)
    data, _ = normalize(load_volume(path), window)
    return data


def _load_slice_images(paths) -> np.ndarray:
    from PIL import Image

    from medpruner.volume import VolumeError

    slices = []
    for path in paths:
        try:
            with Image.open(path) as image:
                slices.append(np.asarray(image.convert("L"), dtype=np.float32) / 255.0)
        except (OSError, ValueError) as err:
            raise VolumeError(path, f"cannot read slice image: {err}") from err
        if slices[-1].shape != slices[0].shape:
            raise VolumeError(path, f"slice size {slices[-1].shape} differs from the first slice's {slices[0].shape}")
    return np.stack(slices)


# ------------------------------------------------------------------------------------------ helpers
class _RowError(Exception):
    """A malformed row: becomes a skip or a DatasetError in :func:`_collect`."""


def _text(record: Mapping, key: str, *, required: bool = True) -> str:
    value = record.get(key)
    if value is None or (isinstance(value, float) and np.isnan(value)) or str(value).strip() == "":
        if required:
            raise _RowError(f"missing or empty field {key!r}")
        return ""
    return str(value).strip()


def _options(value) -> dict[str, str]:
    if value is None or value == "":
        return {}
    if isinstance(value, Mapping):
        return {str(k).strip().upper(): str(v).strip() for k, v in value.items() if str(v).strip()}
    if isinstance(value, (list, tuple)):
        if len(value) > len(LETTERS):
            raise _RowError(f"at most {len(LETTERS)} options, got {len(value)}")
        return {LETTERS[i]: str(v).strip() for i, v in enumerate(value)}
    raise _RowError(f"options must be a mapping or a list, got {type(value).__name__}")


_OPTION_LINE = re.compile(r"^\s*\(?([A-H])[\).:]\s+(.+?)\s*$")


def _options_in_text(question: str) -> dict[str, str]:
    """Options written as lines "A. text" / "(B) text" in the question: consecutive letters from A."""
    found = {}
    for line in question.splitlines():
        match = _OPTION_LINE.match(line)
        if match and match.group(1) == LETTERS[len(found)]:
            found[match.group(1)] = match.group(2)
    return found if len(found) >= 2 else {}


def _letter(value: str, options: Mapping[str, str]) -> str:
    letter = value.strip().strip("().").upper()
    if letter not in LETTERS or (options and letter not in options):
        raise _RowError(f"answer letter {value!r} is not one of the options {sorted(options) or list(LETTERS[:4])}")
    return letter


class _Finder:
    """Resolves volume names under a folder: directly, else by file name anywhere below (indexed once)."""

    def __init__(self, root: Path):
        self.root = root
        self._index: dict[str, Path] | None = None

    def find(self, name: str, suffixes=("",)) -> Path | None:
        for suffix in suffixes:
            candidate = self.root / f"{name}{suffix}"
            if candidate.exists():
                return candidate
        if self._index is None:
            self._index = {}
            for path in sorted(self.root.rglob("*")):
                self._index.setdefault(path.name, path)
        for suffix in suffixes:
            found = self._index.get(Path(f"{name}{suffix}").name)
            if found is not None:
                return found
        return None


def _required_volume(finder: _Finder, name: str, suffixes=("",)) -> Path:
    found = finder.find(name, suffixes)
    if found is None:
        raise _RowError(f"volume {name!r} not found under {finder.root}")
    return found


# ------------------------------------------------------------------------------------------ formats
def _read_csv(path: Path, required: tuple[str, ...]):
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        header = [h.strip() for h in (reader.fieldnames or [])]
        missing = [c for c in required if c not in header]
        if missing:
            raise DatasetError(path, None, f"missing columns {missing}; found {header}")
        for line, row in enumerate(reader, start=2):
            yield f"row {line}", {k.strip(): v for k, v in row.items() if k is not None}


def _m3d(path: Path, volumes: Path, mode: str):
    if mode not in ("closed", "open"):
        raise ValueError(f"mode must be 'closed' or 'open', got {mode!r}")
    required = ("Image Path", "Question", "Answer", "Question Type")
    if mode == "closed":
        required += ("Choice A", "Choice B", "Choice C", "Choice D", "Answer Choice")
    finder = _Finder(volumes)
    for row_name, row in _read_csv(path, required):
        def build(row=row, row_name=row_name):
            volume = _required_volume(finder, _text(row, "Image Path"))
            options, letter = {}, None
            if mode == "closed":
                options = {x: _text(row, f"Choice {x}") for x in "ABCD"}
                letter = _letter(_text(row, "Answer Choice"), options)
            return dict(sample_id=f"{path.stem}:{row_name.split()[-1]}", question=_text(row, "Question"),
                        answer=_text(row, "Answer"), category=_text(row, "Question Type"),
                        volume=VolumeRef(path=volume, unit_range=True), options=options, answer_letter=letter)

        yield row_name, build


def _3drad(path: Path, volumes: Path, mode: str):
    required = ("Task", "VolumeName", "Question", "Answer", "QuestionType")
    finder = _Finder(volumes)
    for row_name, row in _read_csv(path, required):
        def build(row=row, row_name=row_name):
            volume = _required_volume(finder, _text(row, "VolumeName"))
            kind = _text(row, "QuestionType").lower()
            options, letter = {}, None
            if kind.startswith("close"):
                options = {x: _text(row, f"Choice {x}", required=False) for x in "ABCD"}
                options = {k: v for k, v in options.items() if v}
                letter = _letter(_text(row, "AnswerChoice"), options)
            elif not kind.startswith("open"):
                raise _RowError(f"QuestionType must be closed or open, got {kind!r}")
            return dict(sample_id=f"{path.stem}:{row_name.split()[-1]}", question=_text(row, "Question"),
                        answer=_text(row, "Answer"), category=_text(row, "Task"), volume=VolumeRef(path=volume),
                        options=options, answer_letter=letter,
                        extra={"subtask": _text(row, "Subtask", required=False)})

        yield row_name, build


def _read_json_list(path: Path, key: str):
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatasetError(path, None, f"not valid JSON: {err}") from err
    if isinstance(data, Mapping) and isinstance(data.get(key), list):
        data = data[key]
    if not isinstance(data, list):
        raise DatasetError(path, None, f"expected a JSON list of records (or {{{key!r}: [...]}})")
    for i, record in enumerate(data):
        yield f"item {i}", record


def _deeptumor(path: Path, volumes: Path, mode: str):
    from medpruner.volume import SUPPORTED_SUFFIXES

    finder = _Finder(volumes)
    for row_name, record in _read_json_list(path, "questions"):
        def build(record=record):
            if not isinstance(record, Mapping):
                raise _RowError(f"expected a JSON object, got {type(record).__name__}")
            question = _text(record, "question")
            image_id = _text(record, "image_id")
            volume = _required_volume(finder, image_id, ("", *SUPPORTED_SUFFIXES))
            if volume.is_dir() and (volume / "ct.nii.gz").exists():
                volume = volume / "ct.nii.gz"
            options = _options(record.get("options", record.get("choices"))) or _options_in_text(question)
            correct = _text(record, "correct_option", required=False)
            return dict(sample_id=_text(record, "qid"), question=question, answer=_text(record, "answer"),
                        category=_text(record, "question_type"), volume=VolumeRef(path=volume), options=options,
                        answer_letter=_letter(correct, options) if correct else None)

        yield row_name, build


def _natural_key(path: Path):
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", path.name)]


def _hulumed(path: Path, volumes: Path, mode: str):
    from medpruner.eval.metrics import extract_choice

    for row_name, record in _read_json_list(path, "data"):
        def build(record=record, row_name=row_name):
            if not isinstance(record, Mapping):
                raise _RowError(f"expected a JSON object, got {type(record).__name__}")
            turns = record.get("conversations")
            if not isinstance(turns, list):
                raise _RowError("missing field 'conversations' (a list of turns)")
            asked = [t for t in turns if isinstance(t, Mapping) and t.get("from") in ("human", "user")]
            answered = [t for t in turns if isinstance(t, Mapping) and t.get("from") in ("gpt", "assistant")]
            if not asked or not answered:
                raise _RowError("conversations need a human turn and a gpt turn")
            question = _text(asked[0], "value").replace("<image>", "").strip()
            answer = _text(answered[0], "value")
            images = record.get("image", record.get("images"))
            if isinstance(images, str):
                folder = volumes / images
                if not folder.is_dir():
                    raise _RowError(f"slice folder {str(folder)!r} not found")
                slices = sorted((p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES), key=_natural_key)
            elif isinstance(images, list) and images:
                slices = [volumes / str(name) for name in images]
            else:
                raise _RowError("missing field 'image' (a list of slice images or a folder)")
            missing = [str(p) for p in slices if not p.is_file()]
            if missing or not slices:
                raise _RowError(f"slice images not found: {missing[:3] or 'the folder has none'}")
            options = _options(record.get("options")) or _options_in_text(question)
            letter = _text(record, "answer_letter", required=False)
            letter = _letter(letter, options) if letter else (extract_choice(answer, options) if options else None)
            return dict(sample_id=str(record.get("id", row_name.split()[-1])), question=question, answer=answer,
                        category=str(record.get("category") or record.get("question_type") or "all"),
                        volume=VolumeRef(slices=tuple(slices)), options=options, answer_letter=letter)

        yield row_name, build


def _jsonl(path: Path, volumes: Path, mode: str):
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue

            def build(line=line, line_number=line_number):
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise _RowError(f"not valid JSON: {err}") from err
                if not isinstance(record, Mapping):
                    raise _RowError(f"expected a JSON object, got {type(record).__name__}")
                volume = volumes / _text(record, "volume")
                if not volume.exists():
                    raise _RowError(f"volume {str(volume)!r} not found")
                options = _options(record.get("options"))
                letter = _text(record, "answer_letter", required=False)
                unit_range = record.get("unit_range", False)
                if not isinstance(unit_range, bool):
                    raise _RowError(f"unit_range must be true or false, got {unit_range!r}")
                return dict(sample_id=str(record.get("id", f"{path.stem}:{line_number}")),
                            question=_text(record, "question"), answer=_text(record, "answer"),
                            category=str(record.get("category") or "all"),
                            volume=VolumeRef(path=volume, unit_range=unit_range),
                            options=options, answer_letter=_letter(letter, options) if letter else None)

            yield f"line {line_number}", build


_READERS = {"m3d": _m3d, "3drad": _3drad, "deeptumor": _deeptumor, "hulumed": _hulumed, "jsonl": _jsonl}
_PATTERNS = {"m3d": "*.csv", "3drad": "*.csv", "deeptumor": "*.json", "hulumed": "*.json", "jsonl": "*.jsonl"}


def _data_file(path: Path, fmt: str) -> Path:
    if path.is_file():
        return path
    if not path.is_dir():
        raise DatasetError(path, None, "no such file or folder")
    candidates = sorted(path.glob(_PATTERNS[fmt]))
    if len(candidates) != 1:
        raise DatasetError(path, None, f"expected exactly one {_PATTERNS[fmt]} file for format {fmt!r}, found "
                                       f"{[c.name for c in candidates]}; pass the file itself")
    return candidates[0]


def read_dataset(path, format: str, *, volumes=None, on_error: str = "skip", mode: str = "closed") -> Dataset:
    """Read a local dataset.

    Args:
        path: the data file, or a folder holding exactly one data file of the format.
        format: one of :data:`FORMATS`.
        volumes: folder the volume/image paths are relative to (default: the data file's folder).
        on_error: "skip" (count the row in the summary) or "raise" (DatasetError naming file and row).
        mode: M3D-VQA only: "closed" (multiple choice) or "open".
    """
    if format not in _READERS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if on_error not in ("skip", "raise"):
        raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
    file = _data_file(Path(path), format)
    root = Path(volumes) if volumes is not None else file.parent
    samples, skipped, rows = [], [], 0
    for row_name, build in _READERS[format](file, root, mode):
        rows += 1
        try:
            fields = build()
        except _RowError as err:
            if on_error == "raise":
                raise DatasetError(file, row_name, str(err)) from None
            skipped.append((row_name, str(err)))
            continue
        samples.append(Sample(source=f"{file}: {row_name}", **fields))
    return Dataset(format, file, samples, rows, skipped)
