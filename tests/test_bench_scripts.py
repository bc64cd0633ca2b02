"""bench/gpu.py and bench/e2e.py without a GPU: argument parsing, the time budget, the per-section
processes (records streamed, errors and time-outs recorded, the process group killed), the written
tables, and the e2e measurements (direct decode-step timing, the pruning-op timer) on tiny models."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import e2e  # noqa: E402
import gpu  # noqa: E402
import plot  # noqa: E402


# ------------------------------------------------------------------------------------ gpu.py: args
@pytest.mark.parametrize(
    ("text", "expected"), [("iaf=30", ("iaf", 30.0)), ("e2e=0.5", ("e2e", 0.5)), ("merge=1e2", ("merge", 100.0))]
)
def test_parse_budget_accepts_known_sections(text, expected):
    assert gpu.parse_budget(text) == expected


@pytest.mark.parametrize("text", ["iaf", "iaf30", "sort=30", "=30", "iaf=", "iaf=x", "iaf=0", "iaf=-5", "iaf=nan"])
def test_parse_budget_rejects_bad_values(text):
    with pytest.raises(gpu.argparse.ArgumentTypeError, match="--budget"):
        gpu.parse_budget(text)


def test_parse_args_defaults_and_overrides():
    args = gpu.parse_args([])
    assert args.sections == list(gpu.SECTIONS) and args.total_budget == gpu.TOTAL_BUDGET_S
    assert args.budget == [] and args.child is None
    args = gpu.parse_args(["--sections", "iaf", "e2e", "--budget", "e2e=200", "--budget", "iaf=10"])
    assert args.sections == ["iaf", "e2e"] and dict(args.budget) == {"e2e": 200.0, "iaf": 10.0}


@pytest.mark.parametrize(
    "argv",
    [
        ["--total-budget", "0"],
        ["--total-budget", "-1"],
        ["--e2e-repeats", "0"],
        ["--e2e-slices", "64", "0"],
        ["--child", "iaf"],
        ["--sections", "sort"],
        ["--budget", "iaf=-1"],
    ],
)
def test_parse_args_rejects(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        gpu.parse_args(argv)
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_default_budgets_fit_eight_minutes():
    """The sections' defaults sum to the total, and the total leaves room for the parent in 8 min."""
    assert set(gpu.SECTION_BUDGETS_S) == set(gpu.SECTIONS)
    assert sum(gpu.SECTION_BUDGETS_S.values()) <= gpu.TOTAL_BUDGET_S < 8 * 60
    assert all(budget >= gpu.MIN_SECTION_S for budget in gpu.SECTION_BUDGETS_S.values())


# ---------------------------------------------------------------------------------- gpu.py: budget
@pytest.mark.parametrize(
    ("budget", "deadline", "now", "expected"),
    [
        (100.0, 1000.0, 0.0, 100.0),  # the section's own budget binds
        (100.0, 1000.0, 950.0, 50.0),  # what is left of the total binds
        (100.0, 1000.0, 1000.0 - gpu.MIN_SECTION_S, gpu.MIN_SECTION_S),  # exactly the minimum still runs
        (100.0, 1000.0, 990.0, None),  # under the minimum: skipped
        (100.0, 1000.0, 1200.0, None),  # past the deadline
        (5.0, 1000.0, 0.0, None),  # a budget under the minimum never runs
    ],
)
def test_section_limit(budget, deadline, now, expected):
    assert gpu.section_limit(budget, deadline, now) == expected


# ------------------------------------------------------------------------- gpu.py: section process
def _failing_after(records, error):
    yield from records
    raise error


def test_stream_records_keeps_records_before_an_error(tmp_path):
    path = tmp_path / "records.jsonl"
    code = gpu.stream_records(_failing_after([{"op": "a", "ms": 1.5}, {"op": "b"}], RuntimeError("boom")), path)
    assert code == 1
    records, errors = gpu.read_records(path)
    assert records == [{"op": "a", "ms": 1.5}, {"op": "b"}]
    assert len(errors) == 1 and errors[0][gpu.ERROR_KEY] == "RuntimeError: boom"
    assert "_failing_after" in errors[0]["traceback"]


def test_stream_records_clean_run(tmp_path):
    path = tmp_path / "records.jsonl"
    assert gpu.stream_records(iter([{"op": "a", "shape": (2, 3)}]), path) == 0
    assert gpu.read_records(path) == ([{"op": "a", "shape": [2, 3]}], [])


def test_child_mode_records_an_import_error(tmp_path, monkeypatch):
    """``--child``: a section whose module cannot even be imported still leaves an error line."""

    def missing(name):
        raise ModuleNotFoundError(f"No module named {name!r}")

    monkeypatch.setattr(gpu.importlib, "import_module", missing)
    path = tmp_path / "r.jsonl"
    assert gpu.main(["--child", "nucleus", "--records", str(path)]) == 1
    records, errors = gpu.read_records(path)
    assert records == [] and errors[0][gpu.ERROR_KEY] == "ModuleNotFoundError: No module named 'bench_nucleus'"


def test_read_records_drops_only_a_cut_last_line(tmp_path):
    path = tmp_path / "records.jsonl"
    path.write_text('{"op": "a"}\n{"op": "b"}\n{"op": "c", "ms": 1.')
    assert gpu.read_records(path) == ([{"op": "a"}, {"op": "b"}], [])
    path.write_text('{"op": "a"}\n{"op": \n{"op": "c"}\n')
    with pytest.raises(json.JSONDecodeError):
        gpu.read_records(path)
    assert gpu.read_records(tmp_path / "missing.jsonl") == ([], [])


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def _writer(path: Path, records, then: str = "") -> list[str]:
    """A section process that writes ``records`` as JSON lines to ``path``, then runs ``then``."""
    return _python(
        f"""
        import json, os, signal, subprocess, sys, time
        with open({str(path)!r}, "a") as out:
            for record in {records!r}:
                out.write(json.dumps(record) + "\\n")
        print("section log line")
        {then}
        """
    )


def test_run_section_ok(tmp_path):
    records = tmp_path / "r.jsonl"
    result = gpu.run_section("nucleus", _writer(records, [{"op": "x", "ms": 2.0}]), 60, records, tmp_path / "log")
    assert result["status"] == "ok" and result["records"] == [{"op": "x", "ms": 2.0}]
    assert "error" not in result and "log_tail" not in result


def test_run_section_unreadable_records_are_an_error(tmp_path):
    records = tmp_path / "r.jsonl"
    records.write_text('{"op": \n{}\n')  # a cut line that is not the last one
    result = gpu.run_section("nucleus", _python("pass"), 60, records, tmp_path / "log")
    assert result["status"] == "error" and result["error"].startswith("its records file is not JSON lines")
    assert result["records"] == []


def test_run_section_crash_is_an_error_with_the_log(tmp_path):
    records = tmp_path / "r.jsonl"
    command = _writer(records, [{"op": "x"}], "sys.stdout.flush(); os.kill(os.getpid(), signal.SIGSEGV)")
    result = gpu.run_section("merge", command, 60, records, tmp_path / "log")
    assert result["status"] == "error" and result["error"] == f"its process exited with code {-signal.SIGSEGV}"
    assert result["records"] == [{"op": "x"}] and "section log line" in result["log_tail"]


def test_run_section_error_line(tmp_path):
    records = tmp_path / "r.jsonl"
    command = _python(
        f"""
        import sys
        sys.path.insert(0, {str(BENCH)!r})
        import gpu
        def records():
            yield {{"op": "x"}}
            raise ValueError("cu_seqlens is bad")
        sys.exit(gpu.stream_records(records(), __import__("pathlib").Path({str(records)!r})))
        """
    )
    result = gpu.run_section("importance", command, 60, records, tmp_path / "log")
    assert result["status"] == "error" and result["error"] == "ValueError: cu_seqlens is bad"
    assert "in records" in result["traceback"] and result["records"] == [{"op": "x"}]


def test_run_section_timeout_kills_the_process_group(tmp_path):
    """Past its limit the section and everything it started are killed; finished records stay."""
    records, grandchild = tmp_path / "r.jsonl", tmp_path / "grandchild.pid"
    then = f"""
        sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        open({str(grandchild)!r}, "w").write(str(sleeper.pid))
        time.sleep(600)"""
    command = _writer(records, [{"op": "x"}], textwrap.dedent(then).strip().replace("\n", "\n        "))
    result = gpu.run_section("iaf", command, 3, records, tmp_path / "log")
    assert result["status"] == "timeout" and "ran past its 3 s limit" in result["error"]
    assert result["records"] == [{"op": "x"}]
    pid = int(grandchild.read_text())
    for _ in range(100):  # the kill is asynchronous: give the reaper a moment
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        if Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z"):
            break  # killed, waiting for its parent (init) to reap it
        time.sleep(0.05)
    else:
        pytest.fail(f"the section's child process {pid} survived the kill")


# ------------------------------------------------------------------------------ gpu.py: main, tables
def test_main_without_cuda_says_so(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(gpu, "cuda_available", lambda: False)
    assert gpu.main(["--out", str(tmp_path)]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_main_records_every_section_outcome(tmp_path, capsys, monkeypatch):
    """A whole run with stand-in section processes: ok, raising, timed out, skipped, and the tables."""
    behaviour = {
        "nucleus": ([{"op": "nucleus_select", "ms": 0.5}, {"op": "iaf_select", "cuda_graph": True, "ms": 0.2}], ""),
        "merge": ([], "raise SystemExit(gpu_error())"),
        "e2e": ([{"model": "qwen3_vl", "slices": 64, "variant": "fast", "status": "ok", "prefill_ms": 9.0}], ""),
        "iaf": ([{"op": "iaf_select", "ms": 1.0}], "time.sleep(600)"),
    }

    def command(name, records, args):
        records_written, then = behaviour[name]
        if then.startswith("raise"):
            then = (
                f"sys.path.insert(0, {str(BENCH)!r}); import gpu, pathlib\n        "
                "def gpu_error():\n            raise RuntimeError('CUDA error: an illegal memory access')\n"
                f"        sys.exit(gpu.stream_records((gpu_error() for _ in [0]), pathlib.Path({str(records)!r})))"
            )
        return _writer(records, records_written, then)

    monkeypatch.setattr(gpu, "cuda_available", lambda: True)
    monkeypatch.setattr(gpu, "section_command", command)
    monkeypatch.setattr(gpu, "MIN_SECTION_S", 1.0)
    argv = ["--out", str(tmp_path), "--total-budget", "6", "--budget", "iaf=1000"]
    code = gpu.main([*argv, "--sections", "nucleus", "merge", "e2e", "iaf", "importance"])
    assert code == 1
    (path,) = tmp_path.glob("gpu-*.json")
    document = json.loads(path.read_text())
    status = {row["section"]: row["status"] for row in document["sections"]}
    assert status == {"nucleus": "ok", "merge": "error", "e2e": "ok", "iaf": "timeout", "importance": "skipped"}
    merge = next(row for row in document["sections"] if row["section"] == "merge")
    assert merge["error"] == "RuntimeError: CUDA error: an illegal memory access"
    assert document["budget"]["total_s"] == 6 and document["budget"]["sections_s"]["iaf"] == 1000
    assert document["wall_s"] <= 6 + 5  # the last section was cut to the total, not given its 1000 s
    tables = document["tables"]
    assert [(r["section"], r["op"]) for r in tables["ops"]] == [("nucleus", "nucleus_select"), ("iaf", "iaf_select")]
    assert [r["ms"] for r in tables["iaf_cuda_graph"]] == [0.2]
    assert [r["prefill_ms"] for r in tables["e2e_prefill"]] == [9.0]
    env = document["environment"]
    assert {"device", "date", "medpruner_kernels", "git_commit", "torch"} <= set(env)
    out = capsys.readouterr().out
    assert "[importance] skipped" in out and "iaf_cuda_graph" in out and f"wrote {path}" in out


def _result(section, status, records):
    return {"section": section, "status": status, "seconds": 1.0, "limit_s": 9.0, "records": records}


def test_plot_draws_a_gpu_result(tmp_path):
    env = {"device": "NVIDIA H200", "date": "2026-11-29T01:02:03+00:00", "git_commit": "abc"}
    ops = [
        {"op": "iaf_select", "shape": [128, 512, 512], "dtype": "bfloat16", "regime": "many-keeps", "ms": 0.1},
        {"op": "iaf_select", "shape": [128, 512, 512], "dtype": "bfloat16", "ms": 0.2, "ratio_to_floor": 1.3},
        {"op": "iaf_select", "shape": [128, 512, 512], "ms": 0.05, "ratio_to_floor": 1.1, "cuda_graph": True},
        {"op": "merge_tokens", "config": "medgemma-4b 600 slices", "ms": 2.0},
    ]
    rows = [
        {
            "model": "qwen3_vl",
            "slices": s,
            "variant": v,
            "status": "ok",
            "prefill_ms": 10.0 * s / (1 + (v != "unpatched")),
        }
        | ({} if v == "unpatched" else {"tau": 0.9})
        for s in (64, 256)
        for v in e2e.VARIANTS
    ]
    rows.append({"model": "qwen3_vl", "slices": 64, "variant": "fast", "status": "oom"})
    results = [_result("iaf", "ok", ops[:3]), _result("merge", "ok", ops[3:]), _result("e2e", "ok", rows)]
    path = gpu.write_results(tmp_path, env, {"total_s": 9}, results, 3.0)
    assert path.name == "gpu-NVIDIA-H200-20261129T010203.json"
    assert plot.main([str(path)]) == 0
    assert path.with_suffix(".png").stat().st_size > 0
    assert path.with_name(f"{path.stem}-e2e.png").stat().st_size > 0
    assert plot._op_label(ops[0]) == "iaf_select 128x512x512 bfloat16 many-keeps"
    assert plot._op_label(ops[3]) == "merge_tokens medgemma-4b 600 slices"


def test_plot_refuses_a_gpu_result_without_rows(tmp_path):
    failed = _result("iaf", "error", []) | {"error": "RuntimeError: no"}
    path = gpu.write_results(tmp_path, {"device": "cpu", "date": "2026-11-29T00:00:00+00:00"}, {}, [failed], 1.0)
    with pytest.raises(ValueError, match="no op or e2e rows"):
        plot.main([str(path)])


def test_format_table_keeps_present_columns_only():
    text = gpu.format_table([{"op": "a", "ms": 1.23456}, {"op": "bb", "gbps": None}], ("op", "shape", "ms", "gbps"))
    assert text.splitlines() == ["op  ms    gbps", "a   1.23      ", "bb            "]
    assert gpu.format_table([{"x": 1}], ("op",)) == ""


# --------------------------------------------------------------------------------- e2e: decode rate
@pytest.mark.parametrize(
    ("steps", "message"),
    [
        ([], "no decode step was timed"),
        ([0.01, 0.0, 0.01], "1 of 3 decode steps timed non-positive"),
        ([0.01, -0.02], "1 of 2 decode steps timed non-positive"),
        ([math.nan, 0.01], "non-positive or NaN"),
        ([3e-11, 3e-11, 3e-11], "implausible decode rate 3.33e\\+10 tokens/s"),  # the old failure's size
        ([1e-3, 1e-3], "above the ceiling of 500 tokens/s"),
    ],
)
def test_decode_rate_errors_are_never_numbers(steps, message):
    row = e2e.decode_rate(steps, ceiling=500.0)
    assert set(row) == {"decode_error"}
    assert isinstance(row["decode_error"], str) and re.search(message, row["decode_error"])


@pytest.mark.parametrize(
    ("steps", "median"), [([0.02], 0.02), ([0.01, 0.03, 0.02], 0.02), ([0.05, 0.01, 0.01, 0.04], 0.025)]
)
def test_decode_rate_is_one_over_the_median_step(steps, median):
    row = e2e.decode_rate(steps, ceiling=1e6)
    assert row == {
        "decode_tokens_per_s": pytest.approx(1 / median),
        "decode_ms_per_token": pytest.approx(1e3 * median),
        "decode_steps_timed": len(steps),
    }


class _Toy(torch.nn.Module):
    """A language model shaped like the HF classes: a decoder with an input embedding, and a head."""

    def __init__(self, tied: bool, dtype=torch.float32):
        super().__init__()
        self.decoder = torch.nn.Module()
        self.decoder.embed = torch.nn.Embedding(1000, 8, dtype=dtype)
        self.decoder.layer = torch.nn.Linear(8, 8, dtype=dtype)  # 64 + 8 parameters
        self.decoder.get_input_embeddings = lambda: self.decoder.embed
        self.head = torch.nn.Linear(8, 1000, bias=False, dtype=dtype)
        if tied:
            self.head.weight = self.decoder.embed.weight
        self.vision = torch.nn.Linear(100, 100)  # never read by a decode step

    def get_decoder(self):
        return self.decoder

    def get_output_embeddings(self):
        return self.head


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize(("dtype", "size"), [(torch.float32, 4), (torch.bfloat16, 2)])
def test_decode_weight_bytes_counts_the_head_once(tied, dtype, size):
    assert e2e.decode_weight_bytes(_Toy(tied, dtype)) == (72 + 8000) * size
    expected = min(e2e.MAX_DECODE_TOKENS_PER_S, e2e.PEAK_BANDWIDTH_BYTES_PER_S / ((72 + 8000) * size))
    assert e2e.decode_ceiling(_Toy(tied, dtype)) == expected


def test_step_clock_brackets_each_step():
    clock = e2e.StepClock("cpu")
    scores = torch.randn(1, 5)
    for _ in range(4):
        assert clock(None, scores) is scores
        time.sleep(0.001)
    steps = clock.step_seconds()
    assert len(steps) == 3 and all(step > 0 for step in steps)
    assert steps == pytest.approx([b - a for a, b in zip(clock.stamps, clock.stamps[1:])])


# ------------------------------------------------------------------------------ e2e: pruning ops
def test_pruning_op_time_wraps_and_restores():
    import medpruner_kernels
    import medpruner_kernels.nucleus

    originals = (medpruner_kernels.nucleus_select, medpruner_kernels.nucleus.nucleus_select)
    scores = torch.rand(3, 16)
    with e2e.pruning_op_time("cpu") as ops:
        from medpruner_kernels import nucleus_select  # looked up at call time, as the adapters do

        inside = nucleus_select(scores, 0.9, backend="torch")
        medpruner_kernels.nucleus.nucleus_select(scores, 0.5, backend="torch")
        assert medpruner_kernels.nucleus_select is medpruner_kernels.nucleus.nucleus_select  # one wrapper
    assert ops["calls"] == 2 and ops["ms"] > 0
    assert (medpruner_kernels.nucleus_select, medpruner_kernels.nucleus.nucleus_select) == originals
    assert torch.equal(inside, originals[0](scores, 0.9, backend="torch"))


def test_pruning_op_time_restores_after_an_error():
    import medpruner_kernels

    original = medpruner_kernels.iaf_select
    with pytest.raises(ValueError, match="NaN"), e2e.pruning_op_time("cpu") as ops:
        medpruner_kernels.iaf_select(torch.full((4, 8, 8), math.nan), 0.1)
    assert medpruner_kernels.iaf_select is original and ops == {"calls": 0, "ms": 0.0}


# ----------------------------------------------------------------------------- e2e: tiny end to end
def _check_row(row):
    assert row["status"] == "ok", row
    assert row["prefill_ms"] > 0 and 0 < row["visual_tokens"] <= row["visual_tokens_before"]
    if row["variant"] == "unpatched":
        assert not any(key.startswith(("prune", "prefill_speedup", "retention")) for key in row)
    else:
        assert row["prefill_speedup"] > 0 and 0 < row["prune_ms"]
        assert "prune_ops_error" not in row and row["prune_ops_calls"] >= 3
        # The share is taken within one forward, which runs the ops.
        assert 0 < row["prune_ops_share"] < 1


def test_smoke_prints_only_plausible_decode_rates(tmp_path, capsys, monkeypatch):
    """``bench/e2e.py --smoke`` in-process on tiny shapes: every printed decode rate is a positive rate
    under the model's ceiling (the old subtraction of two generate timings printed 3e10 tokens/s)."""
    built = {}
    build_model = e2e.build_model

    def keep_model(family, *args, **kwargs):
        built[family] = build_model(family, *args, **kwargs)
        return built[family]

    monkeypatch.setattr(e2e, "build_model", keep_model)
    path = e2e.main(
        ["--smoke", "--slices", "2", "--decode-tokens", "3", "--repeats", "1", "--output", str(tmp_path / "e2e.json")]
    )
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [(row["model"], row["variant"]) for row in printed] == [
        (model, variant) for model in ("qwen3_vl", "medgemma") for variant in e2e.VARIANTS
    ]
    assert json.loads(path.read_text())["rows"] == printed
    ceilings = {family: e2e.decode_ceiling(model) for family, model in built.items()}
    for row in printed:
        _check_row(row)
        assert "decode_error" not in row, row
        assert 0 < row["decode_tokens_per_s"] <= ceilings[row["model"]]
        assert row["decode_tokens_per_s"] * row["decode_ms_per_token"] == pytest.approx(1e3)
        assert row["decode_steps_timed"] == 2


def test_smoke_rejects_a_single_decode_token(capsys):
    with pytest.raises(SystemExit):
        e2e.main(["--smoke", "--decode-tokens", "1"])
    assert "--decode-tokens must be at least 2" in capsys.readouterr().err


def test_gpu_e2e_section_rows_on_a_tiny_model():
    """The rows gpu.py's e2e section streams (its default taus), computed on CPU with the tiny
    Qwen3-VL: prefill only, unpatched once, each mode at each tau."""
    args = gpu.parse_args(["--e2e-scale", "tiny", "--e2e-slices", "2", "--e2e-repeats", "1"])
    rows = list(gpu.e2e_records(args, "cpu"))
    expected = [(2, "unpatched", None)] + [(2, mode, tau) for tau in (0.9, 0.05) for mode in ("paper", "fast")]
    assert [(row["slices"], row["variant"], row.get("tau")) for row in rows] == expected
    for row in rows:
        _check_row(row)
        assert not any(key.startswith("decode") for key in row)
    unpatched = rows[0]["prefill_ms"]
    for row in rows[1:]:
        assert row["prefill_speedup"] == pytest.approx(unpatched / row["prefill_ms"])
    # A smaller nucleus keeps fewer tokens, in each mode.
    for high, low in zip(rows[1:3], rows[3:5]):
        assert low["visual_tokens"] < high["visual_tokens"]


def test_section_command_round_trips_the_e2e_options(tmp_path):
    args = gpu.parse_args(["--e2e-models", "medgemma", "--e2e-slices", "8", "16", "--e2e-tau", "0.5", "0.1"])
    command = gpu.section_command("e2e", tmp_path / "r.jsonl", args)
    assert command[:2] == [sys.executable, str(BENCH / "gpu.py")]
    child = gpu.parse_args(command[2:])
    assert child.child == "e2e" and child.records == tmp_path / "r.jsonl"
    for name in ("e2e_models", "e2e_slices", "e2e_scale", "e2e_repeats", "e2e_gamma", "e2e_tau"):
        assert getattr(child, name) == getattr(args, name)


def test_eval_table_rows_from_a_summary(tmp_path, capsys):
    import eval_table

    def entry(mean, low, high, retention, agreement=None, kl=None):
        fidelity = {"answer_agreement": agreement, "first_token_kl": kl}
        audit = {} if agreement is None else {"audit": {"fidelity": fidelity}}
        return {"metrics": {"overall": {"accuracy": {"mean": mean, "ci_low": low, "ci_high": high, "n": 10}}},
                "retention": {"overall": retention, "slice_stage": 0.5, "token_stage": retention / 0.5}, **audit}

    summary = {"settings": {"gamma": 0.05, "tau": 0.9}, "dataset": {"samples": 10}, "model": "m",
               "methods": {"none": entry(0.7, 0.4, 0.9, 1.0), "topk": entry(0.6, 0.3, 0.8, 0.25, 0.8, 0.01234)}}
    path = tmp_path / "summary.json"
    path.write_text(json.dumps(summary))
    assert eval_table.main([str(path), "--plot", str(tmp_path / "a.png")]) == 0
    assert (tmp_path / "a.png").read_bytes().startswith(b"\x89PNG")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "gamma 0.05, tau 0.9, 10 questions, model: m"
    assert lines[4] == "| none | 0.700 [0.400, 0.900] | 1.000 | 0.500 | 2.000 | - | - | - | - | - |"
    assert lines[5] == "| topk | 0.600 [0.300, 0.800] | 0.250 | 0.500 | 0.500 | 0.800 | 0.0123 | - | - | - |"
    # with costs: the Pareto front over both runs is starred (accuracy against modelled prefill)
    costly = json.loads(json.dumps(summary))
    for name, ms, seconds in (("none", 40.0, 0.3), ("topk", 17.0, 0.2)):
        costly["methods"][name]["cost"] = {"slices_encoded": 30.0, "seconds_median": {"total": seconds},
                                           "modelled": {"qwen3-vl-8b": {"ms": ms}}}
    second = json.loads(json.dumps(costly))
    second["methods"]["topk"]["metrics"]["overall"]["accuracy"]["mean"] = 0.55
    second["methods"]["topk"]["cost"]["modelled"]["qwen3-vl-8b"]["ms"] = 20.0
    second["methods"]["none"]["cost"]["modelled"]["qwen3-vl-8b"]["ms"] = 45.0
    (tmp_path / "c1.json").write_text(json.dumps(costly))
    (tmp_path / "c2.json").write_text(json.dumps(second))
    assert eval_table.main([str(tmp_path / "c1.json"), str(tmp_path / "c2.json"),
                            "--cost-plot", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").read_bytes().startswith(b"\x89PNG")
    out = capsys.readouterr().out.splitlines()
    rows = [line for line in out if line.startswith("| none") or line.startswith("| topk")]
    assert rows[0].startswith("| none * |") and rows[1].startswith("| topk * |")
    assert rows[1].endswith("| 30.0 | 0.200 | 17.0 |")
    assert rows[2].startswith("| none |") and rows[3].startswith("| topk |")  # dominated by the first run
    path.write_text("{}")
    with pytest.raises(SystemExit):
        eval_table.main([str(path)])
    assert "not a medpruner eval summary" in capsys.readouterr().err


# --------------------------------------------------------------------- medpruner bench (issue 25, item 3)
def _bench_row(group, name, median_ms):
    return {"group": group, "name": name, "median_ms": median_ms, "mean_ms": median_ms, "min_ms": median_ms,
            "rounds": 5}


def test_bench_table_speedup_is_over_the_eager_baseline_and_the_floor_is_a_floor():
    from medpruner.cli.bench import bench_table

    rows = [
        _bench_row("iaf", "test_iaf_cpu_eager_loop", 60.0),
        _bench_row("iaf", "test_iaf_cpu_read_floor", 5.0),
        _bench_row("iaf", "test_iaf_cpu_backend[cpp]", 6.0),
        _bench_row("iaf", "test_iaf_cpu_backend[torch]", 120.0),
        _bench_row("nucleus", "test_nucleus_cpu_sort_cumsum_scatter", 30.0),
        _bench_row("nucleus", "test_nucleus_cpu_backend[cpp]", 10.0),
        _bench_row("misc", "test_sum", 1.0),
    ]
    lines = bench_table(rows).splitlines()
    assert lines[0].split()[-4:] == ["rounds", "floor", "x", "speedup"]
    cells = {line.split()[1]: line.split()[-2:] for line in lines[2:9]}
    assert cells["test_iaf_cpu_eager_loop"] == ["12.0x", "1.0x"]
    # The floor is a bound, not a method: no speedup of its own, and the slowest row is not the reference.
    assert cells["test_iaf_cpu_read_floor"] == ["floor", "floor"]
    assert cells["test_iaf_cpu_backend[cpp]"] == ["1.2x", "10.0x"]
    assert cells["test_iaf_cpu_backend[torch]"] == ["24.0x", "0.5x"]
    assert cells["test_nucleus_cpu_backend[cpp]"] == ["-", "3.0x"]
    assert cells["test_sum"] == ["-", "-"]
    assert "eager torch baseline" in lines[-1]


def test_kernels_notes_name_the_real_reason(tmp_path):
    from medpruner.cli.bench import kernels_notes

    installed = tmp_path / "site" / "medpruner_kernels"
    installed.mkdir(parents=True)
    (installed / "__init__.py").write_text("")
    info = {"file": str(installed / "__init__.py"), "cpp": True, "error": None}
    assert kernels_notes(info, tmp_path) == []

    circular = "cannot import name '_C' from partially initialized module 'medpruner_kernels' (circular import)"
    missing = kernels_notes({**info, "cpp": False, "error": circular}, tmp_path)
    assert len(missing) == 1 and "C++ benchmarks were skipped" in missing[0]
    assert "has no compiled medpruner_kernels._C" in missing[0] and "circular" not in missing[0]
    assert "pip install --no-build-isolation ." in missing[0]

    (installed / "_C.cpython-311-x86_64-linux-gnu.so").write_bytes(b"")
    broken = kernels_notes({**info, "cpp": False, "error": "undefined symbol: _ZN3c10"}, tmp_path)
    assert "failed to load (undefined symbol: _ZN3c10)" in broken[0]

    checkout = tmp_path / "checkout"
    (checkout / "medpruner_kernels").mkdir(parents=True)
    (checkout / "medpruner_kernels" / "__init__.py").write_text("")
    assert "./medpruner_kernels is a source tree" in kernels_notes(info, checkout)[0]
    shadowed = {"file": str(checkout / "medpruner_kernels" / "__init__.py"), "cpp": False, "error": circular}
    assert "run from another folder" in kernels_notes(shadowed, checkout)[0]


def test_bench_from_a_checkout_root_imports_the_installed_kernels(tmp_path, monkeypatch, capsys):
    """From a folder holding a medpruner_kernels source tree (a checkout root), the benchmarks must
    import the installed package, not the folder's (which has no _C): `python -m pytest` put the
    current folder first on the import path."""
    from medpruner import cli

    shadow = tmp_path / "medpruner_kernels"
    shadow.mkdir()
    (shadow / "__init__.py").write_text("SOURCE_TREE_COPY = True\n")
    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "bench_which.py").write_text(
        "import medpruner_kernels\n\n"
        "def test_which(benchmark):\n"
        "    assert not hasattr(medpruner_kernels, 'SOURCE_TREE_COPY'), medpruner_kernels.__file__\n"
        "    benchmark(sum, range(10))\n"
    )
    monkeypatch.chdir(tmp_path)
    assert cli.main(["bench", "--bench-dir", "bench", "--benchmark-disable-gc"]) == 0
    captured = capsys.readouterr()
    assert "test_which" in captured.out
    assert "./medpruner_kernels is a source tree; the benchmarks ran the installed medpruner_kernels" in captured.err
