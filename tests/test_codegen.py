"""The codegen check (bench/codegen.py): every recorded Triton launch of every op compiles for sm_80 and
sm_90 with the wheel's ptxas, without spills beyond bench/codegen.py's explicit STACK_ALLOWANCE, and
attention_importance's hot loops load q/k 16 bytes at a time at the models' head dims."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import DEVICE

from medpruner_kernels._dispatch import TRITON_AVAILABLE, triton_interpret

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "codegen.py"

sys.path.insert(0, str(ROOT / "bench"))
import codegen  # noqa: E402


def test_sass_loop_loads_are_found():
    # A loop (label .L_x_1 up to the backward branch) with a 16-byte load; a 2-byte load outside it.
    sass = "\n".join(
        [
            "        /*0000*/ LDG.E.U16 R5, desc[UR4][R2.64] ;",
            ".L_x_1:",
            "        /*0010*/ LDG.E.128 R8, desc[UR4][R6.64] ;",
            "        /*0020*/ @!P0 BRA `(.L_x_1) ;",
            ".L_x_2:",
            "        /*0030*/ BRA `(.L_x_3) ;",
            ".L_x_3:",
        ]
    )
    found = codegen.analyse_sass(sass)
    assert found["loop_global_loads"] == {"LDG.E.128": 1}
    assert found["loop_load_bytes"] == [16]
    assert found["load_bytes"] == [2, 16]


def test_spills_and_compile_errors_fail():
    launch = {"kernel": "_k", "signature": {"x_ptr": "*fp32"}, "constexprs": [], "num_warps": 4, "num_stages": 2}
    clean = {"registers": 40, "stack_bytes": 0, "local_bytes": 0}
    report = {"record_errors": [], "unlaunched_kernels": [], "launches": [{**launch, "results": {"sm_90": clean}}]}
    assert codegen.failures(report) == []
    report["launches"][0]["results"]["sm_80"] = {**clean, "stack_bytes": 8}
    assert "spills" in codegen.failures(report)[0]
    report["launches"][0]["results"]["sm_80"] = {"error": "ptxas died"}
    assert "compile error" in codegen.failures(report)[0]
    report["unlaunched_kernels"] = ["_other_kernel"]
    assert any("never launched" in f for f in codegen.failures(report))


if TRITON_AVAILABLE:
    import triton
    import triton.language as tl

    @triton.jit
    def _copy_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        offsets = tl.arange(0, BLOCK)
        tl.store(y_ptr + offsets, tl.load(x_ptr + offsets, mask=offsets < n), mask=offsets < n)


def _copy_case(n):
    def thunk():
        x = torch.arange(64, dtype=torch.float32)
        y = torch.full((64,), -1.0)
        _copy_kernel[(1,)](x, y, n, BLOCK=64)
        return y

    return thunk


@pytest.mark.skipif(DEVICE.type == "cuda" or not triton_interpret(), reason="records under the interpreter")
def test_stand_in_keys_are_checked_against_the_real_shape(monkeypatch):
    # 32 and 48 share the launch key (multiples of 16); 17 does not (no divisibility hint).
    same = ("op", "n=32 for n=48", _copy_case(32), _copy_case(48))
    other = ("op", "n=32 for n=17", _copy_case(32), _copy_case(17))
    monkeypatch.setattr(codegen, "cases", lambda quick=False: [same])
    launches, errors = codegen.record_launches()
    assert errors == [] and len(launches) == 1 and launches[0]["kernel"] == "_copy_kernel"
    monkeypatch.setattr(codegen, "cases", lambda quick=False: [other])
    launches, errors = codegen.record_launches()
    assert len(errors) == 1 and "differ from the real shape's: ['_copy_kernel']" in errors[0]


@pytest.mark.skipif(DEVICE.type == "cuda" or not triton_interpret(), reason="records under the interpreter")
def test_key_only_recording_skips_the_kernel_and_zeroes_its_tensors():
    binder = codegen._Binder()
    x = torch.arange(64, dtype=torch.float32)
    y = torch.full((64,), -1.0)
    executed = codegen._record(binder, lambda: _copy_kernel[(1,)](x, y, 48, BLOCK=64))
    assert torch.equal(y[:48], x[:48]) and (y[48:] == -1).all()
    y.fill_(-1.0)
    keys_only = codegen._record(binder, lambda: _copy_kernel[(1,)](x, y, 48, BLOCK=64), execute=False)
    assert keys_only == executed
    assert (y == 0).all() and (x == 0).all()


def _check_importance_load_widths(report):
    """q/k tiles in the hot loops at Dh 72 and 80, every dtype and target: 16-byte loads only, besides
    the column-sum kernel's float32 lse (4 bytes a row)."""
    seen = set()
    for launch in report["launches"]:
        constexprs = dict((path[0], value) for path, value in launch["constexprs"])
        names = list(launch["signature"])
        head_dim = constexprs.get(names.index("HEAD_DIM")) if "HEAD_DIM" in names else None
        if launch["kernel"] not in ("_row_lse_kernel", "_column_sum_kernel") or head_dim not in (72, 80):
            continue
        dtype = launch["signature"]["q_ptr"]
        for target, result in launch["results"].items():
            seen.add((launch["kernel"], head_dim, dtype, target))
            widths = result["loop_load_bytes"]
            where = f"{launch['kernel']} Dh={head_dim} {dtype} {target}: {result['loop_global_loads']}"
            assert 16 in widths, where
            assert widths == ([16] if launch["kernel"] == "_row_lse_kernel" else [4, 16]), where
            scalar = sum(n for op, n in result["loop_global_loads"].items() if codegen._load_bytes(op) == 4)
            assert scalar <= 4, where  # the lse loads: one per row a thread owns
    assert len(seen) == 2 * 2 * 3 * 2, sorted(seen)


@pytest.mark.slow  # compiles every Triton launch for two architectures (~30 s)
def test_every_launch_compiles_without_spills(tmp_path):
    out = tmp_path / "codegen.json"
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--json", str(out)], capture_output=True, text=True, cwd=ROOT
    )
    assert out.exists(), run.stdout[-4000:] + run.stderr[-4000:]
    report = json.loads(out.read_text())
    kernels = {launch["kernel"] for launch in report["launches"]}
    for expected in ("_row_lse_kernel", "_column_sum_kernel", "_nucleus_kernel", "_assign_kernel", "_mean_kernel"):
        assert expected in kernels
    assert report["unlaunched_kernels"] == [] and report["record_errors"] == []
    assert report["stack_allowance"] == []
    assert all(set(launch["results"]) == {"sm_80", "sm_90"} for launch in report["launches"])
    _check_importance_load_widths(report)
    fixed_count = []
    for launch in report["launches"]:
        if launch["kernel"] == "_nucleus_kernel":
            names = list(launch["signature"])
            constexprs = dict((path[0], value) for path, value in launch["constexprs"])
            fixed_count.append(bool(constexprs.get(names.index("FIXED_COUNT"))))
    assert True in fixed_count and False in fixed_count, "the budget (FIXED_COUNT) nucleus variant must be compiled"
    assert run.returncode == 0, "\n".join(report["failures"])
