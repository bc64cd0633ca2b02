"""``medpruner bench``: the bench/ microbenchmarks through pytest-benchmark, shown as a table.

The benchmarks run in a child ``python`` whose import path leaves out the current folder: run from a
checkout, ``python -m pytest`` would otherwise import the checkout's ``medpruner_kernels`` (a source
tree, usually without the compiled ``_C``) instead of the installed one, skip every C++ benchmark and
time the torch fallbacks. The child reports which ``medpruner_kernels`` it imported, and the command
says plainly when that one has no ``_C`` and why.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from medpruner.report import to_json


def _bench_folder(explicit: str | None) -> Path | None:
    if explicit is not None:
        path = Path(explicit)
        return path if path.is_dir() else None
    candidates = [Path.cwd() / "bench"]
    spec = importlib.util.find_spec("medpruner_kernels")
    if spec is not None and spec.origin:
        candidates.append(Path(spec.origin).resolve().parent.parent / "bench")
    return next((c for c in candidates if c.is_dir()), None)


# The child: drop the entry `python -c` puts first (the current folder), write which medpruner_kernels it
# imports, then run pytest with the command line it was given.
_CHILD = """
import json, os, sys
if not sys.flags.safe_path and sys.path and sys.path[0] == "":
    del sys.path[0]
info_path = os.environ.pop("MEDPRUNER_BENCH_INFO")
try:
    import medpruner_kernels
    from medpruner_kernels import _dispatch
    info = {"file": medpruner_kernels.__file__, "cpp": _dispatch.CPP_AVAILABLE, "error": _dispatch.CPP_IMPORT_ERROR}
except Exception as err:
    info = {"file": None, "cpp": False, "error": f"{type(err).__name__}: {err}"}
with open(info_path, "w") as out:
    json.dump(info, out)
import pytest
sys.exit(int(pytest.main()))
"""


def _compiled_files(package: Path) -> list[Path]:
    return sorted(p for pattern in ("_C*.so", "_C*.pyd") for p in package.glob(pattern))


def kernels_notes(info: dict, cwd: Path) -> list[str]:
    """What to tell the user about the ``medpruner_kernels`` the benchmarks imported (``info``: its
    ``file``, whether ``cpp`` loaded and the import ``error``), run from ``cwd``. Empty when all is well."""
    if info.get("file") is None:
        return [f"medpruner bench: the benchmarks could not import medpruner_kernels ({info.get('error')})"]
    package = Path(info["file"]).resolve().parent
    local = cwd / "medpruner_kernels"
    notes = []
    shadowed_by_cwd = local.is_dir() and local.resolve() == package
    if local.is_dir() and not shadowed_by_cwd:
        notes.append(
            f"medpruner bench: ./medpruner_kernels is a source tree; the benchmarks ran the installed "
            f"medpruner_kernels in {package} (the current folder is kept off their import path)"
        )
    if info.get("cpp"):
        return notes
    compiled = _compiled_files(package)
    if compiled:
        reason = (
            f"{compiled[0]} is there but failed to load ({info.get('error')}); usually it was built against "
            "another torch: reinstall with `pip install --no-build-isolation .`"
        )
    else:
        reason = (
            f"{package} has no compiled medpruner_kernels._C (no _C*.so there): a source tree that was never "
            "built, or an install made with MEDPRUNER_NO_EXT=1 or without a C++ compiler. Build it with "
            "`pip install --no-build-isolation .` (in a checkout: `python setup.py build_ext --inplace`)"
        )
    if shadowed_by_cwd:
        reason += (
            "; this is ./medpruner_kernels, put first on the import path by PYTHONPATH: to measure the "
            "installed package, run from another folder or without PYTHONPATH"
        )
    notes.append(
        f"medpruner bench: the C++ benchmarks were skipped and auto-dispatched ops timed their torch "
        f"fallback, because {reason}"
    )
    return notes


def cmd_bench(args) -> int:
    folder = _bench_folder(args.bench_dir)
    if folder is None:
        where = args.bench_dir or "./bench or next to medpruner_kernels"
        print(
            f"medpruner bench: no bench/ folder found ({where}); the microbenchmarks ship with the source "
            "tree, not with the installed package: run this from a checkout",
            file=sys.stderr,
        )
        return 1
    if importlib.util.find_spec("pytest_benchmark") is None:
        print("medpruner bench: needs pytest-benchmark (pip install pytest-benchmark)", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="medpruner-bench-") as scratch:
        results = Path(scratch) / "benchmarks.json"
        info_path = Path(scratch) / "kernels.json"
        command = [
            sys.executable,
            "-c",
            _CHILD,
            str(folder.resolve()),
            "--benchmark-only",
            "-q",
            # The checkout's pyproject sets this too, but a bench/ folder elsewhere has no config.
            "-o",
            "python_files=bench_*.py",
            f"--benchmark-json={results}",
            *args.pytest_args,
        ]
        print("running pytest, the current folder kept off its import path: " + " ".join(command[3:]), file=sys.stderr)
        # The child is a pytest session of its own: called from inside a pytest-xdist worker it would
        # inherit PYTEST_XDIST_WORKER, and pytest-benchmark then disables timing (and rejects
        # --benchmark-only).
        env = {name: value for name, value in os.environ.items() if not name.startswith("PYTEST_XDIST")}
        env["MEDPRUNER_BENCH_INFO"] = str(info_path)
        # pytest's own output goes to stderr, line by line as it comes, so stdout carries only the
        # table (or the JSON).
        with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as child:
            for line in child.stdout:
                sys.stderr.write(line)
        status = child.returncode
        rows = bench_rows(json.loads(results.read_text())) if results.exists() else []
        notes = kernels_notes(json.loads(info_path.read_text()), Path.cwd()) if info_path.exists() else []
    if args.json:
        print(to_json(rows, indent=None))
    elif rows:
        print(bench_table(rows))
    else:
        print("medpruner bench: no benchmark ran", file=sys.stderr)
    for note in notes:
        print(note, file=sys.stderr)
    return status


def bench_rows(report: dict) -> list[dict]:
    """One row per benchmark of a pytest-benchmark JSON report, in milliseconds."""
    rows = []
    for bench in report.get("benchmarks", []):
        stats = bench.get("stats", {})
        rows.append(
            {
                "group": bench.get("group") or "",
                "name": bench.get("name", ""),
                "median_ms": 1e3 * float(stats.get("median", math.nan)),
                "mean_ms": 1e3 * float(stats.get("mean", math.nan)),
                "min_ms": 1e3 * float(stats.get("min", math.nan)),
                "rounds": int(stats.get("rounds", 0)),
            }
        )
    return rows


# A group's eager baseline and its floor, by name (bench/guard.py finds the baseline the same way).
EAGER_MARKERS = ("eager", "sort_cumsum_scatter")
FLOOR_MARKERS = ("floor",)
TABLE_LEGEND = (
    "speedup: the group's eager torch baseline (the row named eager or sort_cumsum_scatter) over this row, "
    "medians; floor x: this row over the group's floor (one read of the data, not a method); "
    "-: the group has no such row"
)


def _marked(row: dict, markers: tuple[str, ...]) -> bool:
    return any(marker in row["name"] for marker in markers)


def _ratio(numerator: float, denominator: float) -> str:
    return f"{numerator / denominator:.1f}x" if denominator > 0 and math.isfinite(numerator) else "-"


def bench_table(rows: list[dict]) -> str:
    """Rows grouped as pytest-benchmark groups them. ``speedup`` is relative to the group's eager
    torch baseline; the floor row (one read of the data) is a bound, not a method: it gets no
    speedup, and every other row its multiple of the floor (``floor x``)."""
    headers = ("group", "benchmark", "median ms", "min ms", "rounds", "floor x", "speedup")
    lines = []
    for group in dict.fromkeys(row["group"] for row in rows):
        members = [row for row in rows if row["group"] == group]
        eager = next((row for row in members if _marked(row, EAGER_MARKERS)), None)
        floor = next((row for row in members if _marked(row, FLOOR_MARKERS)), None)
        for row in members:
            is_floor = row is floor
            lines.append(
                (
                    group,
                    row["name"],
                    f"{row['median_ms']:.3f}",
                    f"{row['min_ms']:.3f}",
                    str(row["rounds"]),
                    "floor" if is_floor else (_ratio(row["median_ms"], floor["median_ms"]) if floor else "-"),
                    "floor" if is_floor else (_ratio(eager["median_ms"], row["median_ms"]) if eager else "-"),
                )
            )
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(headers)]
    numeric = {2, 3, 4, 5, 6}

    def fmt(cells):
        return "  ".join(c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([fmt(headers), fmt(["-" * w for w in widths]), *(fmt(line) for line in lines), "", TABLE_LEGEND])
