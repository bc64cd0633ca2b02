"""``medpruner bench``: the bench/ microbenchmarks through pytest-benchmark, shown as a table."""

from __future__ import annotations

import importlib.util
import json
import math
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
        command = [
            sys.executable,
            "-m",
            "pytest",
            str(folder),
            "--benchmark-only",
            "-q",
            # The checkout's pyproject sets this too, but a bench/ folder elsewhere has no config.
            "-o",
            "python_files=bench_*.py",
            f"--benchmark-json={results}",
            *args.pytest_args,
        ]
        print("running: " + " ".join(command), file=sys.stderr)
        # pytest's own output goes to stderr, line by line as it comes, so stdout carries only the
        # table (or the JSON).
        with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as child:
            for line in child.stdout:
                sys.stderr.write(line)
        status = child.returncode
        rows = bench_rows(json.loads(results.read_text())) if results.exists() else []
    if args.json:
        print(to_json(rows, indent=None))
    elif rows:
        print(bench_table(rows))
    else:
        print("medpruner bench: no benchmark ran", file=sys.stderr)
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


def bench_table(rows: list[dict]) -> str:
    """Rows grouped as pytest-benchmark groups them, each with its speedup over the group's slowest
    (the eager baseline in bench/)."""
    headers = ("group", "benchmark", "median ms", "min ms", "rounds", "speedup")
    lines = []
    for group in dict.fromkeys(row["group"] for row in rows):
        members = [row for row in rows if row["group"] == group]
        slowest = max(row["median_ms"] for row in members)
        for row in members:
            speedup = slowest / row["median_ms"] if row["median_ms"] > 0 else math.nan
            lines.append(
                (
                    group,
                    row["name"],
                    f"{row['median_ms']:.3f}",
                    f"{row['min_ms']:.3f}",
                    str(row["rounds"]),
                    f"{speedup:.1f}x",
                )
            )
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(headers)]
    numeric = {2, 3, 4, 5}

    def fmt(cells):
        return "  ".join(
            c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))
        )

    return "\n".join([fmt(headers), fmt(["-" * w for w in widths]), *(fmt(line) for line in lines)])
