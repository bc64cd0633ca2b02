"""Dataset readers on release folders built at test time to the published layouts (tests/_releases.py),
from volumes that ship offline (nibabel's test data) and synthetic arrays saved as .npy/.nii.gz/PNG."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from _releases import (
    SERIES,
    TEMPORAL_OPTIONS,
    amos_release,
    m3d_release,
    medunieval_m3d,
    rad_release,
    tumor_release,
    unit_volume,
)
from medpruner.eval.readers import DatasetError, read_dataset
from medpruner.eval.readers.base import split_options

NIBABEL_ANATOMICAL = Path(nib.__file__).parent / "tests" / "data" / "anatomical.nii"


def _reasons(dataset) -> dict[str, int]:
    return dataset.summary()["skipped_by_reason"]


def _skips(dataset) -> dict[str, str]:
    return {r["row"]: r["reason"] for r in dataset.summary()["skipped_rows"]}


def test_m3d_release_folder_split_and_exact_paths(tmp_path):
    built = m3d_release(tmp_path)
    dataset = read_dataset(built.data, "m3d")
    assert [s.sample_id for s in dataset] == built.ids and _reasons(dataset) == built.skipped
    assert dataset.split == "test" and [f.name for f in dataset.files] == ["M3D_VQA_test.csv"]
    assert dataset.volumes == tmp_path / "Data" / "data"  # the folder holding M3D_Cap_npy
    first, placeholder = dataset.samples
    assert first.options == {"A": "Liver", "B": "Spleen", "C": "Kidney", "D": "Lung"} and first.answer_letter == "B"
    assert first.category == "Organ" and placeholder.category == "Plane"
    assert placeholder.options == {"A": "Liver", "B": "Spleen", "C": "Kidney"}  # "NA" is no option
    assert first.volume.path == tmp_path / "Data/data/M3D_Cap_npy/ct_quizze/012518" / SERIES
    np.testing.assert_array_equal(first.load(), unit_volume(0)[0])  # [1, D, H, W] -> [D, H, W], already in [0, 1]
    # the missing case is a counted skip naming the path tried, never case 012518's or 007789's volume
    missing = _skips(dataset)["row 3"]
    assert missing.startswith("missing volume:") and f"ct_case/000001/{SERIES}" in missing and "--volumes" in missing
    assert "'D' is not one of the options ['A', 'B', 'C']" in _skips(dataset)["row 5"]
    val = read_dataset(built.data, "m3d", split="val")
    assert [s.category for s in val] == ["Location"] and val.files[0].name == "M3D_VQA_val.csv"
    opened = read_dataset(built.data, "m3d", mode="open")
    assert not opened.samples[0].closed and opened.samples[0].answer == "Spleen"
    with pytest.raises(DatasetError, match=r"M3D_VQA_train\.csv"):
        read_dataset(built.data, "m3d", split="train")
    with pytest.raises(ValueError, match="split: M3D-VQA ships"):
        read_dataset(built.data, "m3d", split="dev")
    with pytest.raises(DatasetError, match=r"M3D_VQA_test\.csv: row 3: missing volume"):
        read_dataset(built.data, "m3d", on_error="raise")
    # a volumes root given explicitly replaces the default, still exactly
    elsewhere = read_dataset(built.data, "m3d", volumes=tmp_path)
    assert len(elsewhere) == 0 and _reasons(elsewhere) == {"malformed row": 2, "missing volume": 3}


def test_3drad_release_every_subtask_as_a_category(tmp_path):
    built = rad_release(tmp_path)
    dataset = read_dataset(built.data, "3drad", volumes=built.volumes)
    assert [s.sample_id for s in dataset] == built.ids and _reasons(dataset) == built.skipped
    assert len(dataset.files) == 3 and dataset.split == "test"
    opened, nodule, temporal = dataset.samples
    assert not opened.closed and opened.options == {} and opened.answer == "Right hilar region."
    assert opened.volume.path == built.volumes / "test_1016/test_1016_d/test_1016_d_2.nii.gz"  # CT-RATE nesting
    assert nodule.options == {"A": "Yes", "B": "No"} and nodule.answer_letter == "B"  # "-" is no option C or D
    assert nodule.category == "Task4_Existence_Detection/Lung nodule" and nodule.volume.path.parent == built.volumes
    assert temporal.options == dict(zip("ABCD", TEMPORAL_OPTIONS)) and temporal.answer_letter == "B"
    data = nodule.load("abdomen")
    assert data.dtype == np.float32 and data.min() >= 0 and data.max() <= 1 and data.ndim == 3
    for term, categories in (("4", ["Task4_Existence_Detection/Lung nodule"]),
                             ("Lung nodule,Task5", ["Task4_Existence_Detection/Lung nodule",
                                                    "Task5_Static_Temporal_Diagnosis/b"]),
                             ("task1_image_observation", ["Task1_Image_Observation/Anatomical_observation"])):
        chosen = read_dataset(built.data, "3drad", volumes=built.volumes, subtask=term)
        assert sorted(chosen.summary()["categories"]) == categories
    with pytest.raises(DatasetError, match="matches no task or subtask"):
        read_dataset(built.data, "3drad", subtask="Task9")
    train = read_dataset(built.data, "3drad", volumes=built.volumes, split="train")
    assert [s.question for s in train] == ["Train question?"]
    table = tmp_path / "valid_path.csv"
    table.write_text(f"VolumeName,Path\ntest_1000_a_1.nii.gz,{built.volumes / 'test_1000_a_1.nii.gz'}\n")
    by_table = read_dataset(built.data, "3drad", volumes=table)
    assert [s.sample_id for s in by_table] == [built.ids[1]] and _reasons(by_table)["missing volume"] == 3


def test_3drad_row_reasons(tmp_path):
    built = rad_release(tmp_path)
    skips = read_dataset(built.data, "3drad", volumes=built.volumes).summary()["skipped_rows"]
    by_file = {(Path(r["file"]).parent.name, r["row"]): r["reason"] for r in skips}
    assert "QuestionType must be Close or Open, got 'sometimes'" in by_file["Task4_Existence_Detection", "row 3"]
    assert "'C' is not one of the options ['A', 'B']" in by_file["Task4_Existence_Detection", "row 4"]
    missing = by_file["Task1_Image_Observation", "row 3"]
    assert missing.startswith("missing volume:") and "test_9999_a_1.nii.gz" in missing
    assert "test_9999/test_9999_a/test_9999_a_1.nii.gz" in missing  # both exact places were tried


def test_deeptumor_release_options_from_mc_question(tmp_path):
    built = tumor_release(tmp_path)
    dataset = read_dataset(built.data, "deeptumor")
    assert [s.sample_id for s in dataset] == built.ids and _reasons(dataset) == built.skipped
    inline, lines = dataset.samples
    assert inline.question == "How would you classify the splenic enlargement based on volume?"
    assert inline.options == {"A": "Normal (no splenomegaly)", "B": "Moderate splenomegaly",
                              "C": "Severe splenomegaly", "D": "Mild splenomegaly"} and inline.answer_letter == "A"
    assert lines.options == {"A": "yes", "B": "no"} and lines.answer_letter == "B" and lines.category == "recognition"
    assert inline.volume.path == built.data / "benchmark/ct/BDMAP_00008446/ct.nii.gz"
    assert "BDMAP_00000404/ct.nii.gz" in _skips(dataset)["item 2"]
    assert "mc_question lists no options" in _skips(dataset)["item 3"]
    opened = read_dataset(built.data, "deeptumor", mode="open")
    assert not opened.samples[0].closed and opened.samples[0].answer == "Normal (no splenomegaly)"
    v1 = tmp_path / "v1.json"
    record = {"question_id": 0, "image_id": "BDMAP_00008446", "question": "q", "answer": "no",
              "multiple_choice_question": "Is it?\nA. yes\nB. no", "correct_option": "B", "question_type": "x"}
    v1.write_text(json.dumps([record]))
    old = read_dataset(v1, "deeptumor", volumes=built.data / "benchmark" / "ct")
    assert [s.sample_id for s in old] == ["0"] and old.samples[0].answer_letter == "B"
    with pytest.raises(ValueError, match="benchmark \\(test\\) split only"):
        read_dataset(built.data, "deeptumor", split="train")


def test_medunieval_json_video_folders(tmp_path):
    built = medunieval_m3d(tmp_path)
    dataset = read_dataset(built.data, "hulumed")
    assert [s.sample_id for s in dataset] == built.ids and _reasons(dataset) == built.skipped
    closed, opened = dataset.samples
    assert closed.question == "Which organ is affected?" and closed.answer_letter == "B"
    assert closed.options == {"A": "Liver", "B": "Spleen", "C": "Kidney", "D": "Lung"} and closed.category == "Organ"
    assert opened.question == "What abnormality is seen?" and not opened.closed and opened.category == "Abnormality"
    # natural slice order: 0, 1, 2, ..., 9, 10, 11 (a string sort would put 10 and 11 after 1)
    assert [p.name for p in closed.volume.slices][:3] == ["0.png", "1.png", "2.png"]
    np.testing.assert_allclose(closed.load(), built.extra["pixels"] / 255.0, rtol=0, atol=1e-7)
    skips = _skips(dataset)
    assert "Question_Type must be CLOSED or OPEN, got 'CHOICE'" in skips["item 3"]
    assert "000001" in skips["item 2"] and "'C. Delayed' is neither" in skips["item 5"]


def test_amos_report_generation(tmp_path):
    built = amos_release(tmp_path)
    dataset = read_dataset(built.data, "amos")
    assert [s.sample_id for s in dataset] == built.ids and _reasons(dataset) == built.skipped
    (report,) = dataset.samples
    assert report.report and not report.closed and report.category == "report"
    assert report.question.startswith("Offer a thorough analysis") and report.answer.startswith("Findings:")
    assert len(report.volume.slices) == 12


@pytest.mark.parametrize("text, stem, options", [
    ("Which?\nA.Yes\nB.No", "Which?", {"A": "Yes", "B": "No"}),
    ("Which? A: x y B: z", "Which?", {"A": "x y", "B": "z"}),
    ("Which?\n(A) x\n(B) y\n(C) z", "Which?", {"A": "x", "B": "y", "C": "z"}),
    ("Hepatitis A. is it?", "Hepatitis A. is it?", {}),
    ("x\nA. one\nC. two", "x\nA. one\nC. two", {}),
    ("x\nA.\nB. two", "x\nA.\nB. two", {}),
])
def test_split_options(text, stem, options):
    assert split_options(text) == (stem, options)


def test_jsonl_with_a_real_offline_volume(tmp_path):
    np.save(tmp_path / "v.npy", unit_volume(3, (4, 16, 16)) * 1000)
    unit = unit_volume(4, (3, 8, 8)) * 0.5 + 0.25
    np.save(tmp_path / "u.npy", unit)
    lines = [
        {"volume": str(NIBABEL_ANATOMICAL), "question": "Which plane?", "answer": "axial",
         "options": {"A": "axial", "B": "sagittal"}, "answer_letter": "a", "category": "plane", "id": "x1"},
        {"volume": "v.npy", "question": "Describe", "answer": "normal"},
        {"volume": "v.npy", "question": "q", "answer": "a", "options": 3},
        {"volume": "u.npy", "question": "q", "answer": "a", "unit_range": True, "id": "u"},
        {"volume": "u.npy", "question": "q", "answer": "a", "unit_range": "yes"},
    ]
    text = "\n".join(json.dumps(line) for line in lines) + "\n\n{broken\n"
    (tmp_path / "data.jsonl").write_text(text)
    dataset = read_dataset(tmp_path, "jsonl")
    assert [s.sample_id for s in dataset] == ["x1", "data:2", "u"]
    skipped = dataset.summary()["skipped_rows"]
    assert [r["row"] for r in skipped] == ["line 3", "line 5", "line 7"]
    assert "unit_range must be true or false" in skipped[1]["reason"]
    np.testing.assert_array_equal(dataset.samples[2].load(), unit.astype(np.float32))  # not rescaled
    mri = dataset.samples[0].load()
    assert mri.shape[0] > 1 and mri.min() >= 0 and mri.max() <= 1 and dataset.samples[0].answer_letter == "A"
    assert dataset.samples[1].load().max() == pytest.approx(1.0)  # percentile-scaled


def test_volume_that_fails_to_load_names_the_row(tmp_path):
    np.save(tmp_path / "flat.npy", np.zeros((5, 5), dtype=np.float32))
    (tmp_path / "t.jsonl").write_text(json.dumps({"volume": "flat.npy", "question": "q", "answer": "a",
                                                  "unit_range": True}) + "\n")
    dataset = read_dataset(tmp_path / "t.jsonl", "jsonl")
    with pytest.raises(DatasetError, match=r"t\.jsonl: line 1: cannot load volume .*flat\.npy"):
        dataset.samples[0].load()


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="format must be one of"):
        read_dataset(tmp_path, "csv")
    with pytest.raises(ValueError, match="on_error"):
        read_dataset(tmp_path, "m3d", on_error="ignore")
    with pytest.raises(DatasetError, match="exactly one"):
        read_dataset(tmp_path, "jsonl")
    with pytest.raises(DatasetError, match="no such file"):
        read_dataset(tmp_path / "nope.csv", "m3d")
    with pytest.raises(ValueError, match="subtask: only the 3drad format"):
        read_dataset(tmp_path, "m3d", subtask="Task4")


def test_placeholder_options_are_not_options(tmp_path):
    np.save(tmp_path / "u.npy", unit_volume(5, (3, 8, 8)))
    line = {"volume": "u.npy", "question": "q", "answer": "yes", "options": ["yes", "no", "-", ""],
            "answer_letter": "A", "unit_range": True}
    (tmp_path / "d.jsonl").write_text(json.dumps(line) + "\n" + json.dumps({**line, "answer_letter": "C"}) + "\n")
    dataset = read_dataset(tmp_path / "d.jsonl", "jsonl")
    assert dataset.samples[0].options == {"A": "yes", "B": "no"}
    assert "'C' is not one of the options ['A', 'B']" in dataset.summary()["skipped_rows"][0]["reason"]
