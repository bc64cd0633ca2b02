"""The MedPruner / Hulu-Med evaluation JSON (GitHub ``Saint-lsy/MedPruner``, ``MedUniEval/utils/M3D/M3D.py``,
``utils/Rad3D/Rad3D.py``, ``utils/Amos/Amos.py`` and ``utils/eval_3d.py``; ``youkangqi/Hulu-Med`` has the
same code). The files come pre-processed with the Hulu-Med evaluation data.

Layout (the code's ``data/Eval``)::

    data/Eval/M3D/M3D_test.json          + the slice folders it names (e.g. ct_quizze/008799/Axial_C__arterial_phase/)
    data/Eval/3DRad/Rad3D_test.json      + e.g. valid_crop/valid_1000_a_1/
    data/Eval/Amos/amos_val_mrg_sft.json + e.g. amos_test_crop_32/amos_0034/

A record: ``"video": [folder]`` (the slice folder, relative to the JSON's folder unless --volumes names
the root), ``"conversations"``: the question (first turn, with a ``<video>`` or ``<image>`` prefix that is
removed) and the reference answer (second turn). VQA (format ``hulumed``): ``Question_Type`` ``CLOSED``
(or ``CLOSE``) or ``OPEN`` (absent: open, as in the published code; any other value is a counted skip,
where the published code drops it silently); ``type`` is the category (M3D: 1-5 = Plane, Phase, Organ,
Abnormality, Location). A closed question lists its options in its text, one a line (``A.Yes``); the gold
answer is the option letter ("B", "B.", "B. Spleen") or the option's text. Report generation (format
``amos``): the second turn is the reference report; the question is the record's own instruction.

Slices: the images of the folder (``.png .jpg .jpeg .bmp .tif``) in natural name order (``2.png`` before
``10.png``). The published code sorts names as strings, which puts ``10.png`` before ``2.png`` when names
are not zero-padded: an IAF over that order compares slices that are not neighbours.
"""

from __future__ import annotations

import re
from pathlib import Path

from medpruner.eval.readers.base import (
    FILTERED,
    ReadRequest,
    Release,
    RowError,
    VolumeRef,
    letter_field,
    pick_file,
    read_json_records,
    require_mapping,
    slice_folder,
    split_options,
    text_field,
)
from medpruner.eval.readers.m3d import QUESTION_TYPES

VQA_FILES = ["M3D_test.json", "Rad3D_test.json"]
REPORT_FILES = ["amos_val_mrg_sft.json"]
_MEDIA_TAG = re.compile(r"^\s*(?:<video>|<image>)\s*", re.IGNORECASE)
_GOLD_LETTER = re.compile(r"^\(?([A-Ha-h])(?:[.):]|\s|$)")


def _turns(record) -> tuple[str, str]:
    turns = record.get("conversations")
    if not isinstance(turns, list) or len(turns) < 2 or not all(isinstance(t, dict) for t in turns[:2]):
        raise RowError("'conversations' must hold a question turn and an answer turn")
    question = _MEDIA_TAG.sub("", text_field(turns[0], "value")).replace("<video>", "").strip()
    if not question:
        raise RowError("the question turn holds only the <video> tag")
    return question, text_field(turns[1], "value")


def _folder(record, root: Path) -> tuple[Path, ...]:
    video = record.get("video")
    if not isinstance(video, list) or not video or not isinstance(video[0], str) or not video[0].strip():
        raise RowError("'video' must be a list holding the slice folder")
    return slice_folder(root / video[0].strip())


def _gold(answer: str, options: dict[str, str]) -> str:
    from medpruner.eval.metrics import extract_choice

    marker = _GOLD_LETTER.match(answer.strip())
    if marker and marker.group(1).upper() in options:
        return letter_field(marker.group(1), options)
    letter = extract_choice(answer, options)
    if letter is None:
        raise RowError(f"the answer {answer[:60]!r} is neither an option letter nor an option's text")
    return letter


def _category(record) -> str:
    kind = record.get("type")
    if kind is None or str(kind).strip() == "":
        return "all"
    return QUESTION_TYPES.get(str(kind).strip(), str(kind).strip())


def read_vqa(request: ReadRequest) -> Release:
    path = pick_file(request.path, VQA_FILES, "MedUniEval VQA file")
    root = request.volumes if request.volumes is not None else path.parent

    def rows():
        for row_name, record in read_json_records(path, "data"):
            def build(record=record, row_name=row_name):
                record = require_mapping(record)
                question, answer = _turns(record)
                kind = text_field(record, "Question_Type", required=False).upper() or "OPEN"
                options, letter = {}, None
                if kind in ("CLOSED", "CLOSE"):
                    question, options = split_options(question)
                    if len(options) < 2:
                        raise RowError("a CLOSED question whose text lists no options A, B, ... one a line")
                    letter = _gold(answer, options)
                elif kind != "OPEN":
                    raise RowError(f"Question_Type must be CLOSED or OPEN, got {kind!r}", FILTERED)
                slices = _folder(record, root)
                return dict(sample_id=str(record.get("id", f"{path.stem}:{row_name.split()[-1]}")),
                            question=question, answer=answer, category=_category(record),
                            volume=VolumeRef(slices=slices), options=options, answer_letter=letter,
                            extra={"video": record["video"][0], "sub_type": record.get("sub-type")})

            yield path, row_name, build

    return Release([path], root, rows())


def read_reports(request: ReadRequest) -> Release:
    path = pick_file(request.path, REPORT_FILES, "AMOS-MM report-generation file")
    root = request.volumes if request.volumes is not None else path.parent

    def rows():
        for row_name, record in read_json_records(path, "data"):
            def build(record=record, row_name=row_name):
                record = require_mapping(record)
                question, report = _turns(record)
                slices = _folder(record, root)
                return dict(sample_id=str(record.get("id", f"{path.stem}:{row_name.split()[-1]}")),
                            question=question, answer=report, category=_category(record) if "type" in record
                            else "report", volume=VolumeRef(slices=slices), report=True,
                            extra={"video": record["video"][0]})

            yield path, row_name, build

    return Release([path], root, rows())
