"""DeepTumorVQA as released (GitHub ``Schuture/DeepTumorVQA``: the v2 release layout in ``HF_README.md``,
``RELEASE_INVENTORY.md`` and ``src/deeptumorvqa/data/loader.py``; the v1 field names in the ``v1``
branch's README).

Layout (v2, Hugging Face ``tumor-vqa/DeepTumorVQA_2.0``)::

    DeepTumorVQA/                   the release folder: pass it as --data
        benchmark/test_qa.json      {"questions": [...], ...}   (or test_qa.jsonl, one question a line)
        benchmark/ct/BDMAP_*/ct.nii.gz

A question: ``qid`` (v1: ``question_id``), ``image_id`` ("BDMAP_00008446"), ``question``, ``answer``,
``mc_question`` (v1: ``multiple_choice_question``: the question with its options A-D in the text),
``correct_option`` (a bare letter), ``question_type`` (the category: recognition, measurement, visual
reasoning, medical reasoning) and ``question_subtype``. ``mode="closed"`` (default) asks the multiple-
choice form: the options are parsed out of ``mc_question`` and shown as options (a row whose
``mc_question`` lists no options A-D in order is skipped); ``mode="open"`` asks ``question`` and scores the
free-form ``answer``. The volume is ``<volumes>/<image_id>/ct.nii.gz`` exactly, ``<volumes>`` being
``benchmark/ct`` unless --volumes names it. Only the benchmark (test) split ships its volumes; the
training questions point to AbdomenAtlas, which is not part of the release.
"""

from __future__ import annotations

from medpruner.eval.readers.base import (
    DatasetError,
    ReadRequest,
    Release,
    RowError,
    VolumeRef,
    exact_path,
    letter_field,
    read_json_records,
    require_mapping,
    split_options,
    text_field,
)


def _first(record, keys: tuple[str, ...], *, required: bool = True) -> str:
    for key in keys:
        value = text_field(record, key, required=False)
        if value:
            return value
    if required:
        raise RowError(f"missing or empty field {' / '.join(repr(k) for k in keys)}")
    return ""


def read(request: ReadRequest) -> Release:
    if request.mode not in ("closed", "open"):
        raise ValueError(f"mode must be 'closed' or 'open', got {request.mode!r}")
    if request.path.is_file():
        path = request.path
    else:
        if request.split != "test":
            raise ValueError(f"split: DeepTumorVQA ships the volumes of its benchmark (test) split only, "
                             f"got {request.split!r}")
        folder = request.path / "benchmark" if (request.path / "benchmark").is_dir() else request.path
        candidates = [folder / "test_qa.json", folder / "test_qa.jsonl"]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            raise DatasetError(request.path, None, "no DeepTumorVQA benchmark here: expected benchmark/test_qa.json "
                                                   "or benchmark/test_qa.jsonl")
    volumes = request.volumes if request.volumes is not None else path.parent / "ct"

    def rows():
        for row_name, record in read_json_records(path, "questions"):
            def build(record=record):
                record = require_mapping(record)
                image_id = text_field(record, "image_id")
                qid = _first(record, ("qid", "question_id"))
                options, letter = {}, None
                if request.mode == "closed":
                    stem, options = split_options(_first(record, ("mc_question", "multiple_choice_question")))
                    if len(options) < 2:
                        raise RowError("mc_question lists no options A, B, ... in order")
                    letter = letter_field(text_field(record, "correct_option"), options)
                    question = stem or text_field(record, "question")
                else:
                    question = text_field(record, "question")
                answer = text_field(record, "answer")
                volume = exact_path(volumes, f"{image_id}/ct.nii.gz")
                return dict(sample_id=qid, question=question, answer=answer,
                            category=text_field(record, "question_type", required=False) or "all",
                            volume=VolumeRef(path=volume), options=options, answer_letter=letter,
                            extra={"subtype": text_field(record, "question_subtype", required=False)})

            yield path, row_name, build

    return Release([path], volumes, rows(), "test" if not request.path.is_file() else None)
