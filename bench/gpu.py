"""One command for the GPU numbers: check every op against its reference on CUDA, time it, and write
``bench/results/<device>-<date>.json`` plus a printed table.

    python bench/gpu.py [--ops iaf nucleus importance merge] [--out bench/results]

Each ``bench/bench_<op>.py`` provides ``gpu_benchmarks(device) -> list[dict]``; this script runs them in
one process so every ratio (kernel vs eager torch vs the copy-bandwidth floor) comes from one run.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

import torch

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

from _common import environment  # noqa: E402

OPS = ("iaf", "nucleus", "importance", "merge")
COLUMNS = ("op", "shape", "dtype", "regime", "ms", "gbps", "ratio_to_floor", "speedup_vs_eager")


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return "" if value is None else str(value)


def print_table(records: list[dict]) -> None:
    rows = [[_cell(record.get(column)) for column in COLUMNS] for record in records]
    widths = [max(len(column), *(len(row[i]) for row in rows)) for i, column in enumerate(COLUMNS)]
    print("  ".join(column.ljust(width) for column, width in zip(COLUMNS, widths)))
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/gpu.py needs a CUDA GPU; the CPU benchmarks run with `pytest bench`", file=sys.stderr)
        return 2

    records, failures = [], []
    for op in args.ops:
        module = importlib.import_module(f"bench_{op}")
        try:
            records.extend(module.gpu_benchmarks("cuda"))
        except Exception as error:  # one failing op must not lose the others' numbers
            failures.append({"op": op, "error": f"{type(error).__name__}: {error}"})
            print(f"{op}: {type(error).__name__}: {error}", file=sys.stderr)

    env = environment()
    args.out.mkdir(parents=True, exist_ok=True)
    device = env["device"].replace(" ", "-")
    path = args.out / f"{device}-{env['date'][:10]}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"environment": env, "records": records, "failures": failures}, indent=2))
    tmp.replace(path)
    print_table(records)
    print(f"wrote {path}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
