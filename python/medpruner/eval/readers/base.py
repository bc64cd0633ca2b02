"""What every dataset reader shares: the sample and dataset records, the row errors that become counted
skips, field and option parsing, exact volume resolution, and volume loading.

A row is skipped (never dropped silently) with one of the :data:`SKIP_REASONS` and a detail that names
the field or the path tried; ``on_error="raise"`` turns the first skip into a :class:`DatasetError`.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

LETTERS = "ABCDEFGH"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
MISSING_VOLUME = "missing volume"
MALFORMED = "malformed row"
FILTERED = "unsupported question type"
SKIP_REASONS = (MISSING_VOLUME, MALFORMED, FILTERED)
# Values the releases write where an option is absent: 3D-RAD "-", M3D-VQA "NA", empty cells, pandas' NaN.
PLACEHOLDER_OPTIONS = frozenset({"", "-", "na", "n/a", "nan", "none", "null"})


class DatasetError(ValueError):
    """A dataset row (or file) that cannot be used; the message names the file and the row."""

    def __init__(self, file, row, reason: str):
        self.file, self.row, self.reason = str(file), row, reason
        where = f"{file}: {row}: " if row is not None else f"{file}: "
        super().__init__(where + reason)


class RowError(Exception):
    """A row that cannot be used: ``kind`` is one of :data:`SKIP_REASONS`; the message says why."""

    def __init__(self, message: str, kind: str = MALFORMED):
        super().__init__(message)
        self.kind = kind


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
    ``answer_letter``: the gold option of a closed question; ``source``: "file: row" for messages;
    ``report``: the answer is a free-text report (long generations)."""

    sample_id: str
    question: str
    answer: str
    category: str
    volume: VolumeRef
    source: str
    options: dict[str, str] = field(default_factory=dict)
    answer_letter: str | None = None
    extra: dict = field(default_factory=dict)
    report: bool = False

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


@dataclass(frozen=True)
class Skip:
    """A row that was not read: where it is, why (one of :data:`SKIP_REASONS`) and the detail."""

    file: str
    row: str
    kind: str
    detail: str


@dataclass
class Dataset:
    """The samples of a release (or one file) and every row that was skipped. ``file``: what was asked
    for (a release folder or a data file); ``files``: the data files read, in order; ``split``: the
    split read, when the release has several."""

    format: str
    file: Path
    samples: list[Sample]
    rows: int
    skipped: list[Skip]
    files: list[Path] = field(default_factory=list)
    split: str | None = None
    volumes: Path | None = None

    def __len__(self) -> int:
        return len(self.samples)

    def __iter__(self) -> Iterator[Sample]:
        return iter(self.samples)

    def summary(self) -> dict:
        return {
            "format": self.format,
            "file": str(self.file),
            "files": [str(f) for f in self.files],
            "split": self.split,
            "volumes": None if self.volumes is None else str(self.volumes),
            "rows": self.rows,
            "samples": len(self.samples),
            "closed": sum(s.closed for s in self.samples),
            "open": sum(not s.closed for s in self.samples),
            "skipped": len(self.skipped),
            "skipped_by_reason": dict(sorted(Counter(s.kind for s in self.skipped).items())),
            "skipped_rows": [{"file": s.file, "row": s.row, "reason": f"{s.kind}: {s.detail}"} for s in self.skipped],
            "categories": dict(sorted(Counter(s.category for s in self.samples).items())),
        }


# A reader yields, per row: the data file, the row's name ("row 7", "item 3") and a function that
# builds the Sample's fields or raises RowError.
RowBuilder = Callable[[], dict]
Rows = Iterator[tuple[Path, str, RowBuilder]]


@dataclass(frozen=True)
class ReadRequest:
    """What :func:`medpruner.eval.readers.read_dataset` was asked: the release folder or data file, the
    split, the subtask filter (3D-RAD), the volumes root given by the user (None: the release's own),
    and the question mode (M3D-VQA and DeepTumorVQA: "closed" or "open")."""

    path: Path
    split: str
    subtask: str | None
    volumes: Path | None
    mode: str


@dataclass
class Release:
    """A reader's plan: the data files it reads, the volumes root, and its rows."""

    files: list[Path]
    volumes: Path
    rows: Rows
    split: str | None = None


# ---------------------------------------------------------------------------------------- loading
def _load(ref: VolumeRef, window) -> np.ndarray:
    from medpruner.volume import VolumeError, load_volume, normalize

    if ref.slices:
        return _load_slice_images(ref.slices)
    path = ref.path
    if ref.unit_range:
        if not path.exists():
            raise VolumeError(path, "no such file or folder")
        if path.suffix != ".npy":
            raise VolumeError(path, "a [0, 1] volume must be a .npy file")
        array = np.load(path, mmap_mode="r")
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


# ------------------------------------------------------------------------------------------ fields
def text_field(record: Mapping, key: str, *, required: bool = True) -> str:
    """The stripped text of ``record[key]``; RowError naming the field when it is missing or empty
    (``required``), else ""."""
    value = record.get(key)
    if value is None or (isinstance(value, float) and math.isnan(value)) or str(value).strip() == "":
        if required:
            raise RowError(f"missing or empty field {key!r}")
        return ""
    return str(value).strip()


def is_placeholder(value) -> bool:
    """An option cell that holds no option: empty, NaN, "-", "NA" (see :data:`PLACEHOLDER_OPTIONS`)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return True
    return str(value).strip().lower() in PLACEHOLDER_OPTIONS


def column_options(row: Mapping, template: str = "Choice {}") -> dict[str, str]:
    """The options of a row with one column per letter (``template`` names the column), placeholders
    left out."""
    return {x: str(row[template.format(x)]).strip() for x in "ABCD"
            if template.format(x) in row and not is_placeholder(row[template.format(x)])}


def options_field(value) -> dict[str, str]:
    """Options given as letter -> text or as a list (taken as A, B, ...); placeholders left out."""
    if value is None or value == "":
        return {}
    if isinstance(value, Mapping):
        return {str(k).strip().upper(): str(v).strip() for k, v in value.items() if not is_placeholder(v)}
    if isinstance(value, (list, tuple)):
        if len(value) > len(LETTERS):
            raise RowError(f"at most {len(LETTERS)} options, got {len(value)}")
        return {LETTERS[i]: str(v).strip() for i, v in enumerate(value) if not is_placeholder(v)}
    raise RowError(f"options must be a mapping or a list, got {type(value).__name__}")


# An option marker: a letter, bare or bracketed, then ".", ")" or ":" ("A. liver", "A.Yes", "(B) x", "C: y").
_MARKER = r"\(?([A-H])(?:[.:]|\))"


def split_options(text: str) -> tuple[str, dict[str, str]]:
    """(stem, options) of a question that lists its options in the text, on their own lines ("A. x"
    / "A.x" / "(A) x") or inline ("... A: x B: y"): the markers must run A, B, C, ... in order, each at
    a line start or after whitespace; fewer than two markers gives ``(text, {})``."""
    found: list[tuple[int, int]] = []  # (marker start, text start) per letter
    position = 0
    for letter in LETTERS:
        pattern = re.compile(rf"(?:^|(?<=\s)){_MARKER.replace('[A-H]', letter)}\s*", re.MULTILINE)
        match = pattern.search(text, position)
        if match is None:
            break
        found.append((match.start(), match.end()))
        position = match.end()
    if len(found) < 2:
        return text.strip(), {}
    options = {}
    for i, (_, start) in enumerate(found):
        end = found[i + 1][0] if i + 1 < len(found) else len(text)
        options[LETTERS[i]] = text[start:end].strip()
    if not all(options.values()):
        return text.strip(), {}
    return text[: found[0][0]].strip(), options


def letter_field(value: str, options: Mapping[str, str]) -> str:
    """A gold option letter ("B", "(b)", "B."); RowError when it is not one of ``options``."""
    letter = value.strip().strip("().").upper()
    if letter not in LETTERS or (options and letter not in options):
        raise RowError(f"answer letter {value!r} is not one of the options {sorted(options) or list(LETTERS[:4])}")
    return letter


# ------------------------------------------------------------------------------------- volume paths
def exact_path(root: Path, relative: str, *, hint: str = "") -> Path:
    """``root / relative`` when it exists; otherwise RowError (a missing volume) naming the path tried.
    Never searches by file name: series names repeat across cases."""
    candidate = root / relative
    if not candidate.exists():
        raise RowError(f"{str(candidate)!r} does not exist{hint}", MISSING_VOLUME)
    return candidate


def natural_key(path: Path):
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", path.name)]


def slice_folder(folder: Path) -> tuple[Path, ...]:
    """The slice images of a folder in natural name order (``2.png`` before ``10.png``); RowError when
    the folder is missing or holds no image."""
    if not folder.is_dir():
        raise RowError(f"slice folder {str(folder)!r} does not exist", MISSING_VOLUME)
    slices = sorted((p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES),
                    key=natural_key)
    if not slices:
        raise RowError(f"slice folder {str(folder)!r} holds no image ({', '.join(IMAGE_SUFFIXES)})", MISSING_VOLUME)
    return tuple(slices)


# ---------------------------------------------------------------------------------------- data files
def read_csv_rows(path: Path, required: tuple[str, ...]) -> Iterator[tuple[str, dict]]:
    """(``"row N"``, row) of a CSV with a header line (N counts lines, the header is line 1);
    DatasetError naming the missing columns."""
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        header = [h.strip() for h in (reader.fieldnames or [])]
        missing = [c for c in required if c not in header]
        if missing:
            raise DatasetError(path, None, f"missing columns {missing}; found {header}")
        for line, row in enumerate(reader, start=2):
            yield f"row {line}", {k.strip(): v for k, v in row.items() if k is not None}


def read_json_records(path: Path, key: str | None = None) -> Iterator[tuple[str, object]]:
    """(``"item i"``, record) of a JSON list (or ``{key: [...]}``), or (``"line n"``, record) of JSON
    lines when the file ends in ``.jsonl`` (a line that is not JSON yields a RowError in its place)."""
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if line.strip():
                    try:
                        yield f"line {number}", json.loads(line)
                    except json.JSONDecodeError as err:
                        yield f"line {number}", RowError(f"not valid JSON: {err}")
        return
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatasetError(path, None, f"not valid JSON: {err}") from err
    if key is not None and isinstance(data, Mapping) and isinstance(data.get(key), list):
        data = data[key]
    if not isinstance(data, list):
        wrapped = f" (or {{{key!r}: [...]}})" if key else ""
        raise DatasetError(path, None, f"expected a JSON list of records{wrapped}")
    for i, record in enumerate(data):
        yield f"item {i}", record


def require_mapping(record) -> Mapping:
    if isinstance(record, RowError):
        raise record
    if not isinstance(record, Mapping):
        raise RowError(f"expected a JSON object, got {type(record).__name__}")
    return record


def pick_file(path: Path, names: list[str], what: str) -> Path:
    """``path`` itself when it is a file, else the first of ``names`` inside the folder ``path``;
    DatasetError listing what the folder holds."""
    if path.is_file():
        return path
    if not path.is_dir():
        raise DatasetError(path, None, "no such file or folder")
    for name in names:
        if (path / name).is_file():
            return path / name
    held = sorted(p.name for p in path.iterdir() if not p.name.startswith("."))
    raise DatasetError(path, None, f"no {what} here: expected {' or '.join(names)}; the folder holds {held[:12]}")
