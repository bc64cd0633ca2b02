"""The codegen check (bench/codegen.py): every recorded Triton launch of every op compiles for sm_80 and
sm_90 with the wheel's ptxas, without spills beyond bench/codegen.py's explicit STACK_ALLOWANCE."""

import json
import subprocess
import sys
from pathlib import Path

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


def test_every_launch_compiles_without_spills(tmp_path):
    out = tmp_path / "codegen.json"
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--json", str(out)], capture_output=True, text=True, cwd=ROOT
    )
    assert out.exists(), run.stdout[-4000:] + run.stderr[-4000:]
    report = json.loads(out.read_text())
    kernels = {launch["kernel"] for launch in report["launches"]}
    for expected in ("_row_lse_kernel", "_column_sum_kernel", "_nucleus_kernel", "_assign_kernel", "_mean_kernel"):
        assert expected in kernels
    assert all(set(launch["results"]) == {"sm_80", "sm_90"} for launch in report["launches"])
    assert run.returncode == 0, "\n".join(report["failures"])
