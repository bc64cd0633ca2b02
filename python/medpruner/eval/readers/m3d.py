"""M3D-VQA as released (Hugging Face ``GoodBaiBai88/M3D-VQA``; columns and paths as written by
``Data/process/m3d_vqa_data_generation.py`` and read by ``LaMed/src/dataset/multi_dataset.py``
``VQADataset`` in the BAAI-DCAI/M3D repository).

Layout::

    <data root>/                        the M3D code's ``data_root`` (``./Data/data``)
        M3D-VQA/                        the release folder: pass it as --data
            M3D_VQA_train.csv  M3D_VQA_val.csv  M3D_VQA_test.csv  M3D_VQA_test5k.csv  M3D_VQA_yn_train.csv
        M3D_Cap_npy/{ct_case,ct_quizze}/<6-digit case>/<series>.npy      (M3D-Cap, 1 x 32 x 256 x 256 in [0, 1])

Columns: ``Image Path, Text, Question Type, Question, Choice A..D, Answer, Answer Choice``. ``Image Path``
("M3D_Cap_npy/ct_quizze/012518/Axial_C__portal_venous_phase.npy") is relative to the data root, which is
the release folder's parent unless --volumes names it; series names repeat across cases, so a path that
does not resolve exactly is a skipped row, never another case's volume. A missing option is written
``NA`` by the generator: a placeholder, not an option. ``Question Type`` 1-5 is Plane, Phase, Organ,
Abnormality, Location (the category). ``--split`` picks ``M3D_VQA_<split>.csv`` (default test);
``mode="open"`` reads the same rows as open-ended questions (the Answer text).
"""

from __future__ import annotations

from medpruner.eval.readers.base import (
    ReadRequest,
    Release,
    RowError,
    VolumeRef,
    column_options,
    exact_path,
    letter_field,
    pick_file,
    read_csv_rows,
    text_field,
)

SPLITS = ("test", "val", "train", "test5k", "yn_train")
QUESTION_TYPES = {"1": "Plane", "2": "Phase", "3": "Organ", "4": "Abnormality", "5": "Location"}
CLOSED_COLUMNS = ("Choice A", "Choice B", "Choice C", "Choice D", "Answer Choice")


def read(request: ReadRequest) -> Release:
    if request.mode not in ("closed", "open"):
        raise ValueError(f"mode must be 'closed' or 'open', got {request.mode!r}")
    if request.split not in SPLITS:
        raise ValueError(f"split: M3D-VQA ships {', '.join(SPLITS)}, got {request.split!r}")
    path = pick_file(request.path, [f"M3D_VQA_{request.split}.csv"], f"M3D-VQA {request.split} split")
    root = request.volumes if request.volumes is not None else path.parent.parent
    required = ("Image Path", "Question", "Answer", "Question Type")
    if request.mode == "closed":
        required += CLOSED_COLUMNS
    hint = "" if request.volumes is not None else (
        f" (Image Path is relative to the folder holding M3D_Cap_npy, by default {root}; pass --volumes)")

    def rows():
        for row_name, row in read_csv_rows(path, required):
            def build(row=row, row_name=row_name):
                question, answer = text_field(row, "Question"), text_field(row, "Answer")
                options, letter = {}, None
                if request.mode == "closed":
                    options = column_options(row)
                    if len(options) < 2:
                        raise RowError(f"fewer than two options in Choice A-D: {sorted(options)}")
                    letter = letter_field(text_field(row, "Answer Choice"), options)
                kind = text_field(row, "Question Type")
                volume = exact_path(root, text_field(row, "Image Path"), hint=hint)
                return dict(sample_id=f"{path.stem}:{row_name.split()[-1]}", question=question,
                            answer=answer, category=QUESTION_TYPES.get(kind, kind),
                            volume=VolumeRef(path=volume, unit_range=True), options=options, answer_letter=letter,
                            extra={"image_path": text_field(row, "Image Path"), "question_type": kind})

            yield path, row_name, build

    return Release([path], root, rows(), request.split)
