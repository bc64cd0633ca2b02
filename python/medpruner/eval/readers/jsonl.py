"""The generic format: one JSON object a line, written by hand or by :mod:`medpruner.synthetic`.

Fields: ``volume`` (a volume file or DICOM folder, relative to --volumes, default the file's folder),
``question``, ``answer``, and optionally ``options`` (letter -> text, or a list taken as A, B, ...;
placeholders such as "-" or "" are left out), ``answer_letter``, ``category``, ``id``, ``unit_range``
(true: the volume is a ``.npy`` already in [0, 1], read without windowing) and ``report`` (true: the
answer is a free-text report, scored as one and generated at report length).
"""

from __future__ import annotations

from medpruner.eval.readers.base import (
    MISSING_VOLUME,
    DatasetError,
    ReadRequest,
    Release,
    RowError,
    VolumeRef,
    letter_field,
    options_field,
    pick_file,
    read_json_records,
    require_mapping,
    text_field,
)


def _flag(record, key: str) -> bool:
    value = record.get(key, False)
    if not isinstance(value, bool):
        raise RowError(f"{key} must be true or false, got {value!r}")
    return value


def read(request: ReadRequest) -> Release:
    if request.path.is_dir():
        found = sorted(request.path.glob("*.jsonl"))
        if len(found) != 1:
            raise DatasetError(request.path, None, f"expected exactly one *.jsonl file, found "
                                                   f"{[p.name for p in found]}; pass the file itself")
        path = found[0]
    else:
        path = pick_file(request.path, [], "JSON lines file")
    root = request.volumes if request.volumes is not None else path.parent

    def rows():
        for row_name, record in read_json_records(path):
            def build(record=record, row_name=row_name):
                record = require_mapping(record)
                volume = root / text_field(record, "volume")
                if not volume.exists():
                    raise RowError(f"{str(volume)!r} does not exist", MISSING_VOLUME)
                options = options_field(record.get("options"))
                letter = text_field(record, "answer_letter", required=False)
                return dict(sample_id=str(record.get("id", f"{path.stem}:{row_name.split()[-1]}")),
                            question=text_field(record, "question"), answer=text_field(record, "answer"),
                            category=str(record.get("category") or "all"),
                            volume=VolumeRef(path=volume, unit_range=_flag(record, "unit_range")),
                            options=options, answer_letter=letter_field(letter, options) if letter else None,
                            report=_flag(record, "report"))

            yield path, row_name, build

    return Release([path], root, rows())
