"""Dataset readers on tiny datasets built in tmp_path, in each format, from volumes that ship offline
(nibabel's test data) and synthetic arrays saved as .npy/.nii.gz/PNG."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from medpruner.eval.readers import DatasetError, read_dataset
from PIL import Image

NIBABEL_ANATOMICAL = Path(nib.__file__).parent / "tests" / "data" / "anatomical.nii"


def write_csv(path: Path, rows: list[dict], header: list[str]) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)
    return path


def unit_volume(seed: int, shape=(1, 4, 16, 16)) -> np.ndarray:
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


def ct_nifti(path: Path, seed: int) -> Path:
    hu = np.random.default_rng(seed).integers(-1000, 1000, size=(12, 10, 6)).astype(np.int16)
    nib.save(nib.Nifti1Image(hu, np.eye(4)), path)
    return path


M3D_HEADER = ["Image Path", "Text", "Question Type", "Question", "Choice A", "Choice B", "Choice C", "Choice D",
              "Answer", "Answer Choice"]


def m3d_row(image, qtype="3", answer_choice="B", question="Which organ?"):
    return {"Image Path": image, "Text": "", "Question Type": qtype, "Question": question, "Choice A": "Liver",
            "Choice B": "Spleen", "Choice C": "Kidney", "Choice D": "Lung", "Answer": "Spleen",
            "Answer Choice": answer_choice}


def test_m3d_reads_rows_and_loads_lazily(tmp_path):
    (tmp_path / "ct" / "001").mkdir(parents=True)
    volume = unit_volume(0)
    np.save(tmp_path / "ct" / "001" / "0.npy", volume)
    data = write_csv(tmp_path / "M3D_VQA_test.csv",
                     [m3d_row("ct/001/0.npy"), m3d_row("ct/001/0.npy", qtype="1", answer_choice="c")], M3D_HEADER)
    closed = read_dataset(tmp_path, "m3d")
    assert len(closed) == 2 and closed.summary()["skipped"] == 0
    first = closed.samples[0]
    assert first.closed and first.options["B"] == "Spleen" and first.answer_letter == "B"
    assert closed.samples[1].answer_letter == "C" and closed.summary()["categories"] == {"1": 1, "3": 1}
    assert first.source == f"{data}: row 2"
    np.testing.assert_array_equal(first.load(), volume[0])  # [1, D, H, W] -> [D, H, W], already in [0, 1]
    opened = read_dataset(data, "m3d", mode="open")
    assert not opened.samples[0].closed and opened.samples[0].answer == "Spleen"


def test_malformed_rows_and_missing_volumes_are_counted_or_raised(tmp_path):
    np.save(tmp_path / "a.npy", unit_volume(1))
    rows = [m3d_row("a.npy"), m3d_row("missing.npy"), m3d_row("a.npy", answer_choice="F"),
            m3d_row("a.npy", question=""), m3d_row("a.npy")]
    data = write_csv(tmp_path / "test.csv", rows, M3D_HEADER)
    dataset = read_dataset(data, "m3d")
    summary = dataset.summary()
    assert (summary["rows"], summary["samples"], summary["skipped"]) == (5, 2, 3)
    assert [r["row"] for r in summary["skipped_rows"]] == ["row 3", "row 4", "row 5"]
    assert "missing.npy" in summary["skipped_rows"][0]["reason"]
    assert "'F'" in summary["skipped_rows"][1]["reason"]
    assert "'Question'" in summary["skipped_rows"][2]["reason"]
    with pytest.raises(DatasetError, match=r"test\.csv: row 3: volume 'missing\.npy' not found"):
        read_dataset(data, "m3d", on_error="raise")
    write_csv(tmp_path / "bad.csv", [{"Question": "q"}], ["Question"])
    with pytest.raises(DatasetError, match=r"bad\.csv: missing columns"):
        read_dataset(tmp_path / "bad.csv", "m3d")


def test_volume_that_fails_to_load_names_the_row(tmp_path):
    np.save(tmp_path / "flat.npy", np.zeros((5, 5), dtype=np.float32))
    dataset = read_dataset(write_csv(tmp_path / "t.csv", [m3d_row("flat.npy")], M3D_HEADER), "m3d")
    with pytest.raises(DatasetError, match=r"t\.csv: row 2: cannot load volume .*flat\.npy"):
        dataset.samples[0].load()


RAD_HEADER = ["Task", "Subtask", "VolumeName", "Question", "Answer", "QuestionType", "AnswerChoice",
              "Choice A", "Choice B", "Choice C", "Choice D"]


def test_3drad_closed_and_open_with_nested_volumes(tmp_path):
    nested = tmp_path / "volumes" / "valid_1" / "valid_1_a"
    nested.mkdir(parents=True)
    ct_nifti(nested / "valid_1_a_1.nii.gz", 0)
    rows = [
        {"Task": "Anomaly Detection", "Subtask": "nodule", "VolumeName": "valid_1_a_1.nii.gz",
         "Question": "Is there a nodule?", "Answer": "Yes", "QuestionType": "Closed", "AnswerChoice": "A",
         "Choice A": "Yes", "Choice B": "No", "Choice C": "", "Choice D": ""},
        {"Task": "Medical Computation", "Subtask": "", "VolumeName": "valid_1_a_1.nii.gz",
         "Question": "How large?", "Answer": "3 cm", "QuestionType": "open", "AnswerChoice": "",
         "Choice A": "", "Choice B": "", "Choice C": "", "Choice D": ""},
        {"Task": "Anomaly Detection", "Subtask": "", "VolumeName": "valid_1_a_1.nii.gz",
         "Question": "q", "Answer": "a", "QuestionType": "maybe", "AnswerChoice": "",
         "Choice A": "", "Choice B": "", "Choice C": "", "Choice D": ""},
    ]
    dataset = read_dataset(write_csv(tmp_path / "3drad.csv", rows, RAD_HEADER), "3drad",
                           volumes=tmp_path / "volumes")
    assert len(dataset) == 2 and dataset.summary()["skipped"] == 1
    closed, opened = dataset.samples
    assert closed.options == {"A": "Yes", "B": "No"} and closed.answer_letter == "A"
    assert closed.category == "Anomaly Detection" and closed.extra["subtask"] == "nodule"
    assert not opened.closed and opened.answer == "3 cm"
    data = closed.load("abdomen")
    assert data.dtype == np.float32 and data.min() >= 0 and data.max() <= 1 and data.ndim == 3


def test_deeptumor_json_with_options_in_the_question(tmp_path):
    (tmp_path / "BDMAP_001").mkdir()
    ct_nifti(tmp_path / "BDMAP_001" / "ct.nii.gz", 1)
    ct_nifti(tmp_path / "BDMAP_002.nii.gz", 2)
    questions = [
        {"qid": "q1", "image_id": "BDMAP_001", "question": "Which organ has the tumor?\nA. liver\nB. pancreas",
         "answer": "pancreas", "correct_option": "B", "question_type": "organ"},
        {"qid": "q2", "image_id": "BDMAP_002", "question": "Tumor size?", "answer": "2 cm",
         "correct_option": "", "question_type": "measurement", "options": ["1 cm", "2 cm"]},
        {"qid": "q3", "image_id": "BDMAP_404", "question": "?", "answer": "x", "correct_option": "A",
         "question_type": "organ"},
        "not an object",
    ]
    (tmp_path / "deeptumor.json").write_text(json.dumps({"questions": questions}))
    dataset = read_dataset(tmp_path, "deeptumor")
    assert [s.sample_id for s in dataset] == ["q1", "q2"]
    assert dataset.samples[0].options == {"A": "liver", "B": "pancreas"} and dataset.samples[0].answer_letter == "B"
    assert dataset.samples[0].volume.path.name == "ct.nii.gz"
    assert dataset.samples[1].options == {"A": "1 cm", "B": "2 cm"} and dataset.samples[1].answer_letter is None
    assert [r["row"] for r in dataset.summary()["skipped_rows"]] == ["item 2", "item 3"]
    # An identity affine puts the third axis closest to z: it becomes the slice axis.
    loaded = dataset.samples[1].load()
    assert loaded.shape[0] == 6 and sorted(loaded.shape[1:]) == [10, 12]


def test_hulumed_json_with_slice_images(tmp_path):
    folder = tmp_path / "images" / "case1"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(3, 8, 9), dtype=np.uint8)
    for i in (2, 10, 1):  # natural order: 1, 2, 10
        Image.fromarray(pixels[{1: 0, 2: 1, 10: 2}[i]]).save(folder / f"slice_{i}.png")
    records = [
        {"id": "s1", "image": "case1", "category": "organ",
         "conversations": [{"from": "human", "value": "<image>\nWhich organ?\nA. liver\nB. spleen"},
                           {"from": "gpt", "value": "B. spleen"}]},
        {"id": "s2", "image": ["case1/slice_10.png", "case1/slice_1.png"],
         "conversations": [{"from": "human", "value": "<image>Describe."}, {"from": "gpt", "value": "normal"}]},
        {"id": "s3", "image": ["case1/nope.png"],
         "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
        {"id": "s4", "image": "case1", "conversations": [{"from": "human", "value": "q"}]},
    ]
    (tmp_path / "hulu.json").write_text(json.dumps(records))
    dataset = read_dataset(tmp_path / "hulu.json", "hulumed", volumes=tmp_path / "images")
    assert [s.sample_id for s in dataset] == ["s1", "s2"] and dataset.summary()["skipped"] == 2
    first, second = dataset.samples
    assert first.question.startswith("Which organ?") and first.answer_letter == "B"
    np.testing.assert_allclose(first.load(), pixels / 255.0, rtol=0, atol=1e-7)
    np.testing.assert_allclose(second.load(), pixels[[2, 0]] / 255.0, rtol=0, atol=1e-7)
    assert not second.closed and second.category == "all"


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


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="format must be one of"):
        read_dataset(tmp_path, "csv")
    with pytest.raises(ValueError, match="on_error"):
        read_dataset(tmp_path, "m3d", on_error="ignore")
    with pytest.raises(DatasetError, match="exactly one"):
        read_dataset(tmp_path, "jsonl")
    with pytest.raises(DatasetError, match="no such file"):
        read_dataset(tmp_path / "nope.csv", "m3d")
