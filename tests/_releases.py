"""Release folders built at test time to the published layouts (folder nesting, file names and columns
as the readers' docstrings cite them), each with a missing volume, a malformed row and the release's own
quirks (placeholder options, series names that repeat across cases, options inside the question text).

Every builder returns a :class:`Built`: the path to pass as ``--data``, the volumes root when it is not
the release's own, and what a reader must find (sample ids in order, skipped rows by reason)."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image

M3D_HEADER = ["Image Path", "Text", "Question Type", "Question", "Choice A", "Choice B", "Choice C", "Choice D",
              "Answer", "Answer Choice"]
RAD_HEADER = ["Task", "Subtask", "VolumeName", "Question", "Answer", "QuestionType", "AnswerChoice",
              "Choice A", "Choice B", "Choice C", "Choice D"]
TEMPORAL_OPTIONS = ["Refractory Lesion (Persistent or recurrent, now present)",
                    "Resolved Lesion (Previously present or recurrent, now absent)",
                    "New Lesion (Absent previously, now present)", "No Abnormality (Always absent)"]


@dataclass
class Built:
    data: Path
    ids: list[str]
    skipped: dict[str, int]
    volumes: Path | None = None
    extra: dict = field(default_factory=dict)


def write_csv(path: Path, rows: list[dict], header: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)
    return path


def unit_volume(seed: int, shape=(1, 4, 16, 16)) -> np.ndarray:
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


def ct_nifti(path: Path, seed: int, shape=(12, 10, 6)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    hu = np.random.default_rng(seed).integers(-1000, 1000, size=shape).astype(np.int16)
    nib.save(nib.Nifti1Image(hu, np.eye(4)), path)
    return path


def slice_pngs(folder: Path, seed: int, count: int = 12, size=(16, 16)) -> np.ndarray:
    """``count`` slices saved as 0.png .. N.png (not zero-padded, as exported slice folders are)."""
    folder.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, size=(count, *size), dtype=np.uint8)
    for i, image in enumerate(pixels):
        Image.fromarray(image).save(folder / f"{i}.png")
    return pixels


# ------------------------------------------------------------------------------------------- M3D-VQA
def m3d_row(image, qtype="3", answer_choice="B", question="Which organ is primarily affected?", d="Lung"):
    return {"Image Path": image, "Text": "report text", "Question Type": qtype, "Question": question,
            "Choice A": "Liver", "Choice B": "Spleen", "Choice C": "Kidney", "Choice D": d, "Answer": "Spleen",
            "Answer Choice": answer_choice}


SERIES = "Axial_C__portal_venous_phase.npy"


def m3d_release(root: Path) -> Built:
    """``Data/data/M3D-VQA/M3D_VQA_{test,val}.csv`` beside ``Data/data/M3D_Cap_npy/...``; the series
    name of case ct_quizze/012518 also exists in case ct_case/007789, and one row names a third case whose
    volume is missing."""
    data_root = root / "Data" / "data"
    for case, seed in (("ct_quizze/012518", 0), ("ct_case/007789", 1)):
        (data_root / "M3D_Cap_npy" / case).mkdir(parents=True)
        np.save(data_root / "M3D_Cap_npy" / case / SERIES, unit_volume(seed))
    release = data_root / "M3D-VQA"
    rows = [
        m3d_row(f"M3D_Cap_npy/ct_quizze/012518/{SERIES}"),
        m3d_row(f"M3D_Cap_npy/ct_case/000001/{SERIES}"),  # missing: the same name exists in other cases
        m3d_row(f"M3D_Cap_npy/ct_case/007789/{SERIES}", qtype="1", answer_choice="C", d="NA"),
        m3d_row(f"M3D_Cap_npy/ct_case/007789/{SERIES}", answer_choice="D", d="NA"),  # gold is a placeholder
        m3d_row(f"M3D_Cap_npy/ct_case/007789/{SERIES}", question=""),
    ]
    write_csv(release / "M3D_VQA_test.csv", rows, M3D_HEADER)
    write_csv(release / "M3D_VQA_val.csv", [m3d_row(f"M3D_Cap_npy/ct_case/007789/{SERIES}", qtype="5")], M3D_HEADER)
    return Built(release, ["M3D_VQA_test:2", "M3D_VQA_test:4"], {"malformed row": 2, "missing volume": 1})


# ------------------------------------------------------------------------------------------- 3D-RAD
def rad_row(task, subtask, volume, question, answer, kind, letter="-", options=("-", "-", "-", "-")):
    return {"Task": task, "Subtask": subtask, "VolumeName": volume, "Question": question, "Answer": answer,
            "QuestionType": kind, "AnswerChoice": letter, **{f"Choice {x}": o for x, o in zip("ABCD", options)}}


def rad_release(root: Path) -> Built:
    """``3DRAD/test/Task*/`` CSVs; volumes in CT-RATE nesting under ``volumes/`` (one flat), one missing."""
    release = root / "3DRAD"
    volumes = root / "volumes"
    ct_nifti(volumes / "test_1016" / "test_1016_d" / "test_1016_d_2.nii.gz", 0)
    ct_nifti(volumes / "test_1000_a_1.nii.gz", 1)
    test = release / "test"
    write_csv(test / "Task1_Image_Observation" / "Anatomical_observation.csv", [
        rad_row(1, 1, "test_1016_d_2.nii.gz", "Where is the largest lymph node observed?", "Right hilar region.",
                "Open"),
        rad_row(1, 1, "test_9999_a_1.nii.gz", "Where?", "Nowhere.", "Open"),  # missing volume
    ], RAD_HEADER)
    write_csv(test / "Task4_Existence_Detection" / "Lung nodule.csv", [
        rad_row(4, 10, "test_1000_a_1.nii.gz", "Does the CT scan reveal lung nodule?", "No", "Close", "B",
                ("Yes", "No", "-", "-")),
        rad_row(4, 10, "test_1000_a_1.nii.gz", "Does it?", "Maybe", "Sometimes", "A", ("Yes", "No", "-", "-")),
        rad_row(4, 10, "test_1000_a_1.nii.gz", "Does it?", "No", "Close", "C", ("Yes", "No", "-", "-")),
    ], RAD_HEADER)
    write_csv(test / "Task5_Static_Temporal_Diagnosis" / "b.csv", [
        rad_row(5, 1, "test_1016_d_2.nii.gz", "How has it evolved?", TEMPORAL_OPTIONS[1], "Close", "B",
                TEMPORAL_OPTIONS),
    ], RAD_HEADER)
    write_csv(release / "train" / "Task4_Existence_Detection" / "Lung nodule.csv", [
        rad_row(4, 10, "test_1000_a_1.nii.gz", "Train question?", "Yes", "Close", "A", ("Yes", "No", "-", "-")),
    ], RAD_HEADER)
    ids = ["Task1_Image_Observation/Anatomical_observation:2", "Task4_Existence_Detection/Lung nodule:2",
           "Task5_Static_Temporal_Diagnosis/b:2"]
    return Built(release, ids, {"malformed row": 2, "missing volume": 1}, volumes=volumes)


# ------------------------------------------------------------------------------------------ DeepTumorVQA
def tumor_question(qid, image_id, mc, answer="Normal (no splenomegaly)", correct="A", kind="medical reasoning"):
    return {"qid": qid, "image_id": image_id, "spacing": "[0.83 0.83 5.0]", "shape": "(12, 10, 6)", "sex": None,
            "age": None, "question": "How would you classify the splenic enlargement based on volume?",
            "answer": answer, "mc_question": mc, "correct_option": correct, "organ": "spleen", "lesion": False,
            "question_type": kind, "question_subtype": "splenomegaly grading",
            "requires_tools": ["segment_organ", "measure"]}


INLINE_MC = ("How would you classify the splenic enlargement based on volume? A: Normal (no splenomegaly) "
             "B: Moderate splenomegaly C: Severe splenomegaly D: Mild splenomegaly")


def tumor_release(root: Path) -> Built:
    """``benchmark/test_qa.json`` (nested under "questions") and ``benchmark/ct/BDMAP_*/ct.nii.gz``."""
    release = root / "DeepTumorVQA"
    ct_nifti(release / "benchmark" / "ct" / "BDMAP_00008446" / "ct.nii.gz", 2)
    questions = [
        tumor_question("bench_00017", "BDMAP_00008446", INLINE_MC),
        tumor_question("bench_00018", "BDMAP_00008446", "Is there a lesion in the pancreas?\nA. yes\nB. no",
                       answer="no", correct="B", kind="recognition"),
        tumor_question("bench_00019", "BDMAP_00000404", INLINE_MC),  # missing volume
        tumor_question("bench_00020", "BDMAP_00008446", "How large is the lesion?"),  # no options in mc_question
        tumor_question("bench_00021", "BDMAP_00008446", INLINE_MC, correct="E"),
    ]
    (release / "benchmark" / "test_qa.json").write_text(json.dumps(
        {"num_questions": len(questions), "question_types": ["recognition", "medical reasoning"],
         "questions": questions}))
    return Built(release, ["bench_00017", "bench_00018"], {"malformed row": 2, "missing volume": 1})


# ------------------------------------------------------------------------------ MedUniEval JSON and AMOS
def conversation(question, answer):
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def medunieval_m3d(root: Path) -> Built:
    """``data/Eval/M3D/M3D_test.json`` with slice folders (``0.png`` .. ``11.png``) beside it."""
    folder = root / "data" / "Eval" / "M3D"
    pixels = slice_pngs(folder / "ct_quizze" / "008799" / "Axial_C__arterial_phase", 0)
    slice_pngs(folder / "ct_quizze" / "005322" / "Axial_C__arterial_phase", 1, count=3)
    records = [
        {"video": ["./ct_quizze/008799/Axial_C__arterial_phase"], "Question_Type": "CLOSED", "type": 3,
         "conversations": conversation("<video>\nWhich organ is affected?\nA.Liver\nB.Spleen\nC.Kidney\nD.Lung",
                                       "B")},
        {"video": ["./ct_quizze/005322/Axial_C__arterial_phase"], "Question_Type": "OPEN", "type": 4,
         "conversations": conversation("<video>\nWhat abnormality is seen?", "A hypodense liver lesion.")},
        {"video": ["./ct_quizze/000001/Axial_C__arterial_phase"], "Question_Type": "OPEN", "type": 4,
         "conversations": conversation("<video>\nWhat?", "Nothing.")},  # missing folder
        {"video": ["./ct_quizze/008799/Axial_C__arterial_phase"], "Question_Type": "CHOICE", "type": 1,
         "conversations": conversation("<video>\nWhich plane?", "Axial")},  # neither CLOSED nor OPEN
        {"video": ["./ct_quizze/008799/Axial_C__arterial_phase"], "Question_Type": "CLOSED", "type": 1,
         "conversations": [{"from": "human", "value": "<video>\nWhich plane?\nA.Axial\nB.Coronal"}]},
        {"video": ["./ct_quizze/008799/Axial_C__arterial_phase"], "Question_Type": "CLOSED", "type": 2,
         "conversations": conversation("<video>\nWhich phase?\nA.Arterial\nB.Venous", "C. Delayed")},
    ]
    (folder / "M3D_test.json").write_text(json.dumps(records))
    return Built(folder, ["M3D_test:0", "M3D_test:1"],
                 {"malformed row": 2, "missing volume": 1, "unsupported question type": 1},
                 extra={"pixels": pixels})


def amos_release(root: Path) -> Built:
    """``data/Eval/Amos/amos_val_mrg_sft.json`` with ``amos_test_crop_32/amos_*`` slice folders."""
    folder = root / "data" / "Eval" / "Amos"
    slice_pngs(folder / "amos_test_crop_32" / "amos_0034", 3)
    instruction = "<video>\nOffer a thorough analysis of the 3D image, leading to a list of findings."
    records = [
        {"id": "amos_0034", "video": ["amos_test_crop_32/amos_0034"],
         "conversations": conversation(instruction, "Findings: The liver is normal. Impression: Normal abdomen.")},
        {"id": "amos_0035", "video": ["amos_test_crop_32/amos_0035"],
         "conversations": conversation(instruction, "Findings: Renal cyst.")},  # missing folder
        {"id": "amos_0036", "video": "amos_test_crop_32/amos_0034",
         "conversations": conversation(instruction, "x")},  # video is not a list
    ]
    (folder / "amos_val_mrg_sft.json").write_text(json.dumps(records))
    return Built(folder, ["amos_0034"], {"malformed row": 1, "missing volume": 1})
