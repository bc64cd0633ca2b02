"""``medpruner eval`` in-process on the default model (the shipped synthetic-VQA checkpoint): a small dataset
in each format, built in tmp_path from volumes that ship offline, every method at matched budgets, the
audit in the report, resume, the offline default dataset (the synthetic test split), and the usage errors."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from _releases import (
    M3D_HEADER,
    Built,
    amos_release,
    m3d_release,
    m3d_row,
    medunieval_m3d,
    rad_release,
    tumor_release,
    write_csv,
)
from medpruner.cli import main
from medpruner.selectors import SELECTORS, get_selector
from test_checkpoint import _script
from test_eval_readers import NIBABEL_ANATOMICAL

ALL = sorted(SELECTORS)


def _jsonl(root):
    folder = root / "generic"
    folder.mkdir()
    line = {"volume": str(NIBABEL_ANATOMICAL), "question": "Which plane?", "answer": "axial",
            "options": {"A": "axial", "B": "sagittal"}, "answer_letter": "A", "category": "plane", "id": "x1"}
    (folder / "d.jsonl").write_text(json.dumps(line) + "\n" + json.dumps({**line, "volume": "gone.nii"}) + "\n")
    return Built(folder, ["x1"], {"missing volume": 1})


BUILDERS = {"m3d": m3d_release, "3drad": rad_release, "deeptumor": tumor_release, "hulumed": medunieval_m3d,
            "amos": amos_release, "jsonl": _jsonl}
BASE = ["--resolution", "64", "--tau", "0.5", "--max-new-tokens", "1", "--bootstrap", "20", "--backend", "torch",
        "--device", "cpu", "--no-progress"]


def _run(root, fmt, *extra, built=None):
    built = built or BUILDERS[fmt](root)
    volumes = ["--volumes", str(built.volumes)] if built.volumes else []
    return main(["eval", "--data", str(built.data), "--format", fmt, "--out", str(root / "out"), *volumes, *BASE,
                 *extra])


@pytest.mark.slow  # every method through the model, once per format
@pytest.mark.parametrize("fmt", sorted(BUILDERS))
def test_every_format_and_every_method_at_matched_budgets(tmp_path, fmt, capsys):
    built = BUILDERS[fmt](tmp_path)
    assert _run(tmp_path, fmt, "--methods", "all", "--limit", "1", built=built) == 0
    printed = capsys.readouterr().out
    # the counts come before the table and again after it
    head, tail = printed.split("\nmethod ", 1)
    assert f"rows       {len(built.ids) + sum(built.skipped.values())} read, {len(built.ids)} usable" in head
    for reason, count in built.skipped.items():
        assert f"  skipped  {count} {reason}: " in head and f"  skipped  {count} {reason}: " in tail
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
    assert summary["dataset"]["format"] == fmt and summary["dataset"]["skipped_by_reason"] == built.skipped
    assert records[0]["sample_id"] == built.ids[0]
    closed = records[0]["closed"]
    assert summary["methods"]["topk"]["primary_metric"] == ("accuracy" if closed else "token_f1")
    # open answers are scored by exact match as their accuracy, so the audit covers them too
    assert (out / "category_deltas.png").is_file()
    assert all(r["correct"] == r["metrics"]["accuracy"] for r in records)
    # cost: a slice-stage method is charged the slices it keeps, the others every slice
    for record in records:
        slice_stage = get_selector(record["method"]).slice_stage
        assert record["slices_encoded"] == record["slices_kept" if slice_stage else "slices_total"]
        assert set(record["seconds_split"]) == {"tower", "pruning", "llm_prefill"}
        assert set(record["modelled"]) == {"qwen3-vl-8b", "qwen2.5-vl-7b", "medgemma-4b"}
    assert (out / "cost.png").is_file() and set(summary["pareto_cost"]) == set(ALL)
    assert "qwen3-vl-8b ms" in printed


def test_rerun_resumes_and_json_output(tmp_path, capsys):
    built = m3d_release(tmp_path)
    assert _run(tmp_path, "m3d", "--methods", "iaf", "--no-html", built=built) == 0
    lines = (tmp_path / "out" / "samples.jsonl").read_text()
    assert not (tmp_path / "out" / "report.html").exists()
    capsys.readouterr()
    assert _run(tmp_path, "m3d", "--methods", "iaf", "--json", built=built) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert "rows       5 read, 2 usable" in captured.err  # with --json the counts go to stderr
    assert (tmp_path / "out" / "samples.jsonl").read_text() == lines
    assert list(summary["methods"]) == ["none", "iaf"] and summary["methods"]["iaf"]["n"] == 2
    assert (tmp_path / "out" / "report.html").is_file()


def test_readme_m3d_command_on_the_release_folder(tmp_path, capsys):
    """The README's ``medpruner eval --data M3D-VQA/ --format m3d`` from the data root, as the M3D code
    lays it out (``Data/data``: the CSV folder beside M3D_Cap_npy), with --split and the counts."""
    built = m3d_release(tmp_path)
    assert _run(tmp_path, "m3d", "--methods", "medpruner", "--split", "val", "--json", built=built) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert summary["dataset"]["split"] == "val" and summary["dataset"]["files"] == [str(built.data / "M3D_VQA_val.csv")]
    assert "data       m3d (split val): " in captured.err and "categories 1: Location 1" in captured.err


def test_amos_report_generation_with_the_paper_metrics(tmp_path, capsys):
    built = amos_release(tmp_path)
    args = [*(a for a in BASE if a not in ("--max-new-tokens", "1")), "--methods", "medpruner", "--metrics", "paper"]
    assert main(["eval", "--data", str(built.data), "--format", "amos", "--out", str(tmp_path / "out"), *args,
                 "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["settings"]["max_new_tokens"] == 512 and summary["settings"]["metrics"] == "paper"
    entry = summary["methods"]["medpruner"]
    assert entry["primary_metric"] == "bleu4"
    assert set(entry["metrics"]["overall"]) == {"bleu1", "bleu2", "bleu3", "bleu4", "rouge1", "rouge2", "rougeL"}
    assert summary["methods"]["none"]["metrics"]["unavailable"]["meteor"].startswith("unavailable")
    records = [json.loads(line) for line in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    assert all(r["report"] and r["correct"] is None for r in records)


def test_3drad_subtask_filter_from_the_command_line(tmp_path, capsys):
    built = rad_release(tmp_path)
    assert _run(tmp_path, "3drad", "--methods", "iaf", "--subtask", "Task4", "--json", built=built) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["dataset"]["categories"] == {"Task4_Existence_Detection/Lung nodule": 1}
    assert main(["eval", "--data", str(built.data), "--format", "m3d", "--subtask", "4", "--out",
                 str(tmp_path / "o2")]) == 2
    assert "--subtask: only the 3drad format" in capsys.readouterr().err


def test_usage_errors(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()

    def run(*extra):
        return main(["eval", "--data", str(data), "--format", "m3d", "--out", str(tmp_path / "out"), *BASE, *extra])

    with pytest.raises(SystemExit) as exit_info:
        run("--methods", "iaf,fastv")
    assert exit_info.value.code == 2 and "unknown method(s) ['fastv']" in capsys.readouterr().err
    assert run() == 2
    assert "no M3D-VQA test split here: expected M3D_VQA_test.csv" in capsys.readouterr().err
    write_csv(data / "M3D_VQA_test.csv", [m3d_row("M3D_Cap_npy/ct_case/1/missing.npy")], M3D_HEADER)
    assert run() == 2
    captured = capsys.readouterr()
    assert "no usable samples (1 rows skipped; see above)" in captured.err
    assert "  skipped  1 missing volume: M3D_VQA_test.csv row 2: " in captured.out and "missing.npy" in captured.out
    assert run("--on-error", "raise") == 2
    assert "M3D_VQA_test.csv: row 2: missing volume: " in capsys.readouterr().err
    assert run("--split", "dev") == 2
    assert "split: M3D-VQA ships test, val" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run("--tau", "0")
    assert "tau must be" in capsys.readouterr().err
    assert main(["eval", "--data", str(data), "--out", str(tmp_path / "out")]) == 2
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


def test_model_tiny_vqa_v2_runs_the_v2_task_at_16_tokens_a_slice(tmp_path, capsys, monkeypatch):
    """``--model tiny-vqa-v2`` without --data: the CT-like task v2's test split (its own folder), the v2
    checkpoint at its training resolution through 8-pixel patches (16 visual tokens a slice), named as v2
    in the summary. The weights here are the untrained v2 architecture saved as the training
    script saves them: the wiring is tested, not the accuracy (tests/test_checkpoint.py does that)."""
    import medpruner.checkpoints as checkpoints
    from medpruner.cli.models import TINY_VQA_V2_NAME
    from medpruner.synthetic import ct

    script = _script()
    processor = checkpoints.tiny_vqa_processor(version=2)
    weights = script.save(checkpoints.build_tiny_vqa(processor.tokenizer, version=2), tmp_path / "v2")
    monkeypatch.setattr(checkpoints, "TINY_VQA_V2_WEIGHTS", weights)
    out = tmp_path / "out"
    args = ["eval", "--out", str(out), "--model", "tiny-vqa-v2", "--synthetic-volumes", "2", "--methods",
            "medpruner", "--bootstrap", "20", "--device", "cpu", "--no-progress", "--no-html", "--json"]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    expected = ct.generate_split("test", 2)
    assert summary["model"] == TINY_VQA_V2_NAME and summary["settings"]["resolution"] == 64
    assert summary["dataset"]["samples"] == len(expected)
    assert (out / "synthetic-v2-test" / "test-2.jsonl").is_file() and not (out / "synthetic-test").exists()
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    reference = [r for r in records if r["method"] == "none"]
    assert [r["question"] for r in reference] == [s.question for s in expected]
    assert all(r["tokens_total"] == ct.TOKENS_PER_SLICE * r["slices_total"] for r in reference)


def test_tiny_vqa_v2_loader_errors(tmp_path, monkeypatch, capsys):
    """Missing v2 weights name the command that trains them (the CLI says which --model failed); a
    version that does not exist is a ValueError naming the argument."""
    import medpruner.checkpoints as checkpoints

    monkeypatch.setattr(checkpoints, "TINY_VQA_V2_WEIGHTS", tmp_path / "absent.safetensors")
    with pytest.raises(FileNotFoundError, match="train_tiny_vqa.py --version 2"):
        checkpoints.load_tiny_vqa(version=2)
    assert main(["eval", "--out", str(tmp_path / "out"), "--model", "tiny-vqa-v2", "--synthetic-volumes", "1",
                 "--device", "cpu", "--no-progress", "--no-html"]) == 2
    assert "--model tiny-vqa-v2: cannot load the shipped checkpoint" in capsys.readouterr().err
    for version in (0, 3, True, "2"):
        with pytest.raises(ValueError, match="version must be one of"):
            checkpoints.load_tiny_vqa(version=version)


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


def test_a_used_folder_refuses_other_settings_unless_asked(tmp_path, capsys):
    built = m3d_release(tmp_path)
    assert _run(tmp_path, "m3d", "--methods", "iaf", "--no-html", built=built) == 0
    records = (tmp_path / "out" / "samples.jsonl").read_text()
    capsys.readouterr()
    assert _run(tmp_path, "m3d", "--methods", "iaf", "--no-html", "--gamma", "0.1", built=built) == 2
    err = capsys.readouterr().err
    assert "holds records of other settings" in err and "gamma 0.05 -> 0.1" in err and "--allow-other-settings" in err
    assert (tmp_path / "out" / "samples.jsonl").read_text() == records  # nothing appended
    assert _run(tmp_path, "m3d", "--methods", "iaf", "--no-html", "--gamma", "0.1", "--allow-other-settings",
                "--json", built=built) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["settings"]["gamma"] == 0.1 and summary["methods"]["iaf"]["n"] == 2
    assert len((tmp_path / "out" / "samples.jsonl").read_text().splitlines()) == 2 * len(records.splitlines())


def test_out_is_checked_before_any_work_and_ctrl_c_says_what_is_saved(tmp_path, capsys, monkeypatch):
    built = m3d_release(tmp_path)
    (tmp_path / "out").write_text("a file")
    assert _run(tmp_path, "m3d", "--methods", "iaf", built=built) == 2
    captured = capsys.readouterr()
    assert "--out" in captured.err and "rows " not in captured.out  # refused before the data was read
    (tmp_path / "out").unlink()

    import medpruner.eval.runner as runner

    original = runner.eval_sample

    def interrupt_after_the_first_sample(*args, **kwargs):
        if (tmp_path / "out" / "samples.jsonl").stat().st_size:
            raise KeyboardInterrupt
        yield from original(*args, **kwargs)

    monkeypatch.setattr(runner, "eval_sample", interrupt_after_the_first_sample)
    assert _run(tmp_path, "m3d", "--methods", "iaf", built=built) == 130
    assert "interrupted: 2 record(s) of this run saved" in capsys.readouterr().err  # none and iaf of sample 1
    monkeypatch.setattr(runner, "eval_sample", original)
    assert _run(tmp_path, "m3d", "--methods", "iaf", "--json", built=built) == 0
    assert json.loads(capsys.readouterr().out)["methods"]["iaf"]["n"] == 2


def test_the_progress_bar_counts_only_the_work_left(tmp_path, capsys, monkeypatch):
    import tqdm.auto

    built = m3d_release(tmp_path)
    assert _run(tmp_path, "m3d", "--methods", "iaf", "--no-html", "--limit", "1", built=built) == 0
    totals = []
    real = tqdm.auto.tqdm

    def spy(*args, **kwargs):
        totals.append(kwargs.get("total"))
        return real(*args, **kwargs)

    monkeypatch.setattr(tqdm.auto, "tqdm", spy)
    assert _run(tmp_path, "m3d", "--methods", "iaf", "--no-html", built=built) == 0
    assert totals == [1]  # one of the two samples is left


def test_the_synthetic_validation_split_is_its_own_stream(tmp_path):
    """Tune on val, report test once (issue 27): without --data, --split val writes the validation
    volumes, disjoint from the test ones; other splits are refused (the training stream is not one)."""
    from medpruner.cli.common import CommandError
    from medpruner.cli.eval import synthetic_dataset

    val = synthetic_dataset(tmp_path, 3, "val")
    test = synthetic_dataset(tmp_path, 3, "test")
    assert val.parent.name == "synthetic-val" and test.parent.name == "synthetic-test"
    rows = {name: [json.loads(line) for line in path.read_text().splitlines()] for name, path in
            (("val", val), ("test", test))}
    assert rows["val"] and rows["test"]
    first = {name: np.load(path.parent / rows[name][0]["volume"]) for name, path in (("val", val), ("test", test))}
    assert first["val"].shape != first["test"].shape or not np.array_equal(first["val"], first["test"])
    with pytest.raises(CommandError, match="synthetic task .* has the splits test, val"):
        synthetic_dataset(tmp_path, 3, "train")
