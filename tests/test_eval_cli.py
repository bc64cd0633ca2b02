"""``medpruner eval`` in-process on the default model (the shipped synthetic-VQA checkpoint): a small dataset
in each format, built in tmp_path from volumes that ship offline, every method at matched budgets, the
audit in the report, resume, the offline default dataset (the synthetic test split), and the usage errors."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from medpruner.cli import main
from medpruner.selectors import SELECTORS, get_selector
from PIL import Image
from test_eval_readers import M3D_HEADER, NIBABEL_ANATOMICAL, RAD_HEADER, ct_nifti, m3d_row, unit_volume, write_csv

ALL = sorted(SELECTORS)


def _m3d(root):
    (root / "ct").mkdir()
    np.save(root / "ct" / "0.npy", unit_volume(0, (1, 4, 16, 16)))
    write_csv(root / "m3d.csv", [m3d_row("ct/0.npy")], M3D_HEADER)


def _3drad(root):
    ct_nifti(root / "a.nii.gz", 0)
    write_csv(root / "rad.csv", [{
        "Task": "Anomaly Detection", "Subtask": "nodule", "VolumeName": "a.nii.gz", "Question": "Is there a nodule?",
        "Answer": "Yes", "QuestionType": "Closed", "AnswerChoice": "A", "Choice A": "Yes", "Choice B": "No",
        "Choice C": "", "Choice D": ""}], RAD_HEADER)


def _deeptumor(root):
    ct_nifti(root / "BDMAP_1.nii.gz", 1)
    (root / "dt.json").write_text(json.dumps([{
        "qid": "q1", "image_id": "BDMAP_1", "question": "Which organ has the tumor?\nA. liver\nB. pancreas",
        "answer": "pancreas", "correct_option": "B", "question_type": "organ"}]))


def _hulumed(root):
    (root / "case").mkdir()
    pixels = np.random.default_rng(0).integers(0, 256, size=(3, 16, 16), dtype=np.uint8)
    for i, image in enumerate(pixels):
        Image.fromarray(image).save(root / "case" / f"{i}.png")
    (root / "hulu.json").write_text(json.dumps([{
        "id": "h1", "image": "case", "category": "organ",
        "conversations": [{"from": "human", "value": "<image>\nDescribe the organ."},
                          {"from": "gpt", "value": "normal liver"}]}]))


def _jsonl(root):
    line = {"volume": str(NIBABEL_ANATOMICAL), "question": "Which plane?", "answer": "axial",
            "options": {"A": "axial", "B": "sagittal"}, "answer_letter": "A", "category": "plane", "id": "x1"}
    (root / "d.jsonl").write_text(json.dumps(line) + "\n")


BUILDERS = {"m3d": _m3d, "3drad": _3drad, "deeptumor": _deeptumor, "hulumed": _hulumed, "jsonl": _jsonl}
BASE = ["--resolution", "64", "--tau", "0.5", "--max-new-tokens", "1", "--bootstrap", "20", "--backend", "torch",
        "--device", "cpu", "--no-progress"]


def _run(root, fmt, *extra):
    return main(["eval", "--data", str(root / "data"), "--format", fmt, "--out", str(root / "out"), *BASE, *extra])


@pytest.mark.parametrize("fmt", sorted(BUILDERS))
def test_every_format_and_every_method_at_matched_budgets(tmp_path, fmt, capsys):
    (tmp_path / "data").mkdir()
    BUILDERS[fmt](tmp_path / "data")
    assert _run(tmp_path, fmt, "--methods", "all") == 0
    printed = capsys.readouterr().out
    out = tmp_path / "out"
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["methods"]) == set(ALL) and summary["methods_added"] == ["none"]
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(records) == len(ALL)
    by = {r["method"]: r for r in records}
    budget = by["medpruner"]["tokens_kept"]
    assert 0 < budget <= by["none"]["tokens_kept"] == by["medpruner"]["tokens_total"]
    for method in ALL:
        assert summary["methods"][method]["n"] == 1 and f"\n{method} " in printed
        if get_selector(method).budgeted:
            assert by[method]["budget"] == budget
            per_slice = by["none"]["tokens_kept"] // by["none"]["slices_total"]
            limit = per_slice // 2 if method == "uniform_slices" else 0
            assert abs(by[method]["tokens_kept"] - budget) <= limit
        if method != "none":
            assert set(summary["methods"][method]["audit"]) == {"category_deltas", "answer_flips", "fidelity"}
    page = (out / "report.html").read_text()
    assert "Audit: accuracy change per category" in page and "Audit: answers that flip" in page
    assert (out / "pareto.png").is_file()
    assert summary["dataset"]["format"] == fmt and summary["dataset"]["skipped"] == 0
    closed = records[0]["closed"]
    assert summary["methods"]["topk"]["primary_metric"] == ("accuracy" if closed else "token_f1")
    # open answers are scored by exact match as their accuracy, so the audit covers them too
    assert (out / "category_deltas.png").is_file()
    assert all(r["correct"] == r["metrics"]["accuracy"] for r in records)


def test_rerun_resumes_and_json_output(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    _m3d(tmp_path / "data")
    assert _run(tmp_path, "m3d", "--methods", "iaf", "--no-html") == 0
    lines = (tmp_path / "out" / "samples.jsonl").read_text()
    assert not (tmp_path / "out" / "report.html").exists()
    capsys.readouterr()
    assert _run(tmp_path, "m3d", "--methods", "iaf", "--json") == 0
    summary = json.loads(capsys.readouterr().out)
    assert (tmp_path / "out" / "samples.jsonl").read_text() == lines
    assert list(summary["methods"]) == ["none", "iaf"] and summary["methods"]["iaf"]["n"] == 1
    assert (tmp_path / "out" / "report.html").is_file()


def test_usage_errors(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        _run(tmp_path, "m3d", "--methods", "iaf,fastv")
    assert exit_info.value.code == 2 and "unknown method(s) ['fastv']" in capsys.readouterr().err
    assert _run(tmp_path, "m3d") == 2
    assert "expected exactly one *.csv" in capsys.readouterr().err
    write_csv(tmp_path / "data" / "m3d.csv", [m3d_row("missing.npy")], M3D_HEADER)
    assert _run(tmp_path, "m3d") == 2
    err = capsys.readouterr().err
    assert "no usable samples (1 rows skipped" in err and "missing.npy" in err
    assert _run(tmp_path, "m3d", "--on-error", "raise") == 2
    assert "m3d.csv: row 2: volume 'missing.npy' not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _run(tmp_path, "m3d", "--tau", "0")
    assert "tau must be in (0, 1]" in capsys.readouterr().err
    assert main(["eval", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "out")]) == 2
    assert "--data needs --format" in capsys.readouterr().err
    assert main(["eval", "--format", "m3d", "--out", str(tmp_path / "out")]) == 2
    assert "--format m3d needs --data" in capsys.readouterr().err


def test_offline_default_is_the_synthetic_split_on_the_checkpoint(tmp_path, capsys):
    """Without --data and --model: the synthetic test split, categories by lesion class, the shipped
    checkpoint at its own resolution, every question scored (closed by option, open by exact match)."""
    from medpruner.cli.models import TINY_VQA_NAME
    from medpruner.synthetic import generate_split

    out = tmp_path / "out"
    args = ["eval", "--out", str(out), "--synthetic-volumes", "3", "--methods", "medpruner_budget,topk",
            "--bootstrap", "20", "--device", "cpu", "--no-progress", "--no-html", "--json"]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    expected = generate_split("test", 3)
    assert summary["model"] == TINY_VQA_NAME and summary["settings"]["resolution"] == 64
    assert summary["dataset"]["format"] == "jsonl" and summary["dataset"]["samples"] == len(expected)
    assert summary["dataset"]["categories"] == dict(sorted(Counter(s.lesion_class for s in expected).items()))
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(records) == 4 * len(expected)  # none, medpruner (added), medpruner_budget, topk
    reference = [r for r in records if r["method"] == "none"]
    assert [r["question"] for r in reference] == [s.question for s in expected]
    # 64 px slices through 16 px patches merged 2 x 2: 4 tokens a slice
    assert all(r["tokens_total"] == 4 * r["slices_total"] for r in reference)
    assert all(r["correct"] in (0.0, 1.0) for r in records)
    data = out / "synthetic-test" / "test-3.jsonl"
    before = data.stat().st_mtime_ns
    assert main(args) == 0  # resumed: the split is reused, nothing is rerun
    capsys.readouterr()
    assert data.stat().st_mtime_ns == before
    assert len((out / "samples.jsonl").read_text().splitlines()) == len(records)


def test_vllm_engine_usage_errors(tmp_path, capsys, monkeypatch):
    """``--engine vllm`` usage, refused before anything is loaded (no vLLM needed): --model and --budget
    are required, methods the plugin cannot run are named, the vLLM-only options are refused with the
    other engines, and a missing vLLM says how to install it."""
    import sys

    out = ["eval", "--out", str(tmp_path / "out"), "--no-progress"]
    model = ["--model", str(tmp_path)]
    assert main([*out, "--engine", "vllm", "--budget", "0.5"]) == 2
    assert "--engine vllm needs --model" in capsys.readouterr().err
    assert main([*out, "--engine", "vllm", *model]) == 2
    assert "--engine vllm needs --budget" in capsys.readouterr().err
    assert main([*out, "--engine", "vllm", *model, "--budget", "64", "--methods", "none,topk,medpruner"]) == 2
    err = capsys.readouterr().err
    assert "--methods topk,medpruner: the vLLM engine runs none,medpruner_budget only" in err
    assert "need the HF engine" in err
    assert main([*out, "--engine", "vllm", "--model", str(tmp_path / "missing"), "--budget", "64"]) == 2
    assert "missing: not a folder" in capsys.readouterr().err
    for engine in ("local", "ray"):
        assert main([*out, "--engine", engine, "--budget", "0.5", "--max-model-len", "512"]) == 2
        assert "--budget, --max-model-len: only with --engine vllm" in capsys.readouterr().err
    for budget, message in (("0", "budget as an int must be >= 1"), ("1.5", "budget must be in (0, 1]"),
                            ("half", "budget must be a number")):
        with pytest.raises(SystemExit):
            main([*out, "--engine", "vllm", *model, "--budget", budget])
        assert message in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "vllm", None)  # an import of vllm now fails
    assert main([*out, "--engine", "vllm", *model, "--budget", "0.5"]) == 2
    assert "--engine vllm needs vLLM: pip install vllm" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
