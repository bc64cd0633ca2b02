"""One command for the GPU numbers, under 8 minutes on an H100/H200: every op against its floor, the
graph-captured IAF and the end-to-end prefill, written to ``bench/results/gpu-<device>-<stamp>.json``.

    python bench/gpu.py                                   # every section, 450 s in all
    python bench/gpu.py --sections iaf e2e --budget e2e=200 --e2e-slices 64 256 600

Sections run one after another, each in its own process under a time limit: its budget (``--budget
NAME=SECONDS`` overrides the defaults), cut to what is left of ``--total-budget`` for the whole command.
A section that raises, takes the CUDA context down or runs past its limit becomes an error record (with
the records it had finished and the tail of its log), and the next section still runs. Sections:

- ``iaf``, ``nucleus``, ``importance``, ``merge``: ``bench/bench_<op>.py``'s ``gpu_benchmarks(device)``
  (checked against the float64 reference, then timed against the eager baseline and the floor). Records
  that carry ``"cuda_graph": true`` (the IAF replayed from a captured CUDA graph) form their own table.
- ``e2e``: bench/e2e.py's prefill rows on a random-weight Qwen3-VL-8B (``--e2e-scale full``, the
  published config) at ``--e2e-slices`` slices of 384^2, unpatched and then paper and fast mode at each
  ``--e2e-tau`` (random weights attend almost uniformly, so tau 0.9 keeps most tokens; 0.05 gives the
  few percent a trained model keeps): prefill time, speedup over unpatched, retention, and the share of
  the pruned prefill spent pruning (the whole stage, vision tower included, and the kernel ops alone).

The JSON holds the environment (device, date, package version, git commit), the limits, one table per
kind (``ops``, ``iaf_cuda_graph``, ``e2e_prefill``) and one status row per section. Exit code: 0 when
every section finished, 1 when one failed, ran out of time or was skipped, 2 without a CUDA device.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(0, str(BENCH_DIR.parent / "python"))

OPS = ("iaf", "iaf_local", "nucleus", "importance", "merge")
SECTIONS = (*OPS, "e2e")
# Seconds per section on an H100/H200, start-up (~10 s: torch, CUDA context, Triton cache) included. They
# sum to TOTAL_BUDGET_S; the 30 s left of 8 minutes cover the parent and the writing.
SECTION_BUDGETS_S = {"iaf": 95, "iaf_local": 35, "nucleus": 40, "importance": 90, "merge": 70, "e2e": 120}
TOTAL_BUDGET_S = 450.0
# With less left than this a section could not even start its process and import torch: it is skipped.
MIN_SECTION_S = 20.0
# The line a section's process writes when its benchmarks raise (records never carry this key).
ERROR_KEY = "section_error"
LOG_TAIL_CHARS = 4000
TABLE_COLUMNS = {
    "ops": (
        "op",
        "config",
        "shape",
        "dtype",
        "regime",
        "matches_reference",
        "ms",
        "floor_ms",
        "ratio_to_floor",
        "gbps",
        "speedup_vs_eager",
        "ratio_to_sdpa",
        "speedup_vs_sort_cumsum_scatter",
    ),
    "iaf_cuda_graph": ("op", "shape", "dtype", "regime", "matches_reference", "ms", "floor_ms", "ratio_to_floor"),
    "e2e_prefill": (
        "model",
        "slices",
        "variant",
        "tau",
        "status",
        "prompt_tokens",
        "visual_tokens",
        "retention",
        "prefill_ms",
        "prefill_speedup",
        "prune_ms",
        "prune_share",
        "prune_ops_ms",
        "prune_ops_share",
    ),
}


# ------------------------------------------------------------------------------------------- budget
def parse_budget(text: str) -> tuple[str, float]:
    """``NAME=SECONDS`` of ``--budget``: a known section and a positive number of seconds."""
    name, sep, seconds = text.partition("=")
    if not sep or name not in SECTIONS:
        raise argparse.ArgumentTypeError(
            f"--budget takes NAME=SECONDS with NAME in {', '.join(SECTIONS)}, got {text!r}"
        )
    try:
        value = float(seconds)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"--budget {name}: SECONDS must be a positive number, got {seconds!r}")
    return name, value


def section_limit(budget_s: float, deadline: float, now: float) -> float | None:
    """Seconds the next section may run: its own budget cut to what is left before ``deadline`` (both
    on the ``time.monotonic`` clock), or None (skip it) when that is under :data:`MIN_SECTION_S`."""
    limit = min(budget_s, deadline - now)
    return limit if limit >= MIN_SECTION_S else None


# ------------------------------------------------------------------------------- a section's process
def stream_records(records, path: Path) -> int:
    """Append each record of the iterable ``records`` to ``path`` as a JSON line the moment it comes
    (so a section killed at its limit keeps what it finished); if the iteration raises, append an
    :data:`ERROR_KEY` line with the exception and its traceback. Returns the exit code: 0 or 1."""
    with path.open("a") as out:
        try:
            for record in records:
                out.write(json.dumps(record, default=str) + "\n")
                out.flush()
        except Exception as error:  # one failing section must not lose the others' numbers
            line = {ERROR_KEY: f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()}
            out.write(json.dumps(line) + "\n")
            return 1
    return 0


def e2e_records(args, device: str):
    """bench/e2e.py's prefill rows (no decode) for ``--e2e-models`` x ``--e2e-slices``, one at a time."""
    import e2e
    import torch

    return e2e.iter_rows(
        args.e2e_models,
        args.e2e_slices,
        device=device,
        dtype=torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32,
        tiny=args.e2e_scale == "tiny",
        decode_tokens=0,
        repeats=args.e2e_repeats,
        gamma=args.e2e_gamma,
        taus=args.e2e_tau,
        qwen_size=384,
    )


def section_records(name: str, args):
    """Section ``name``'s records, lazily: an import error is then the section's error record."""
    if name == "e2e":
        yield from e2e_records(args, "cuda")
    else:
        yield from importlib.import_module(f"bench_{name}").gpu_benchmarks("cuda")


def section_command(name: str, records: Path, args) -> list[str]:
    """The command line that runs section ``name`` in its own process, writing to ``records``."""
    command = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--records", str(records)]
    command += ["--e2e-scale", args.e2e_scale, "--e2e-repeats", str(args.e2e_repeats)]
    command += ["--e2e-gamma", repr(args.e2e_gamma), "--e2e-tau", *map(repr, args.e2e_tau)]
    command += ["--e2e-models", *args.e2e_models, "--e2e-slices", *map(str, args.e2e_slices)]
    return command


# ------------------------------------------------------------------------------------------ parent
def read_records(path: Path) -> tuple[list[dict], list[dict]]:
    """The records and the error lines a section wrote. A last line cut off by a kill is dropped."""
    records, errors = [], []
    if not path.exists():
        return records, errors
    lines = path.read_text().splitlines()
    for index, line in enumerate(lines):
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            if index == len(lines) - 1:
                continue
            raise
        (errors if ERROR_KEY in value else records).append(value)
    return records, errors


def _tail(path: Path) -> str:
    return path.read_text(errors="replace")[-LOG_TAIL_CHARS:] if path.exists() else ""


def run_section(name: str, command: list[str], limit_s: float, records_path: Path, log_path: Path) -> dict:
    """Run ``command`` (which streams JSON lines to ``records_path``) for at most ``limit_s`` seconds;
    past that its whole process group is killed. Returns the section's result: name, status ("ok",
    "error" or "timeout"), seconds, limit, records, and for a failure the error and the log's tail."""
    started = time.monotonic()
    with log_path.open("w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = process.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            code = None
    try:
        records, errors = read_records(records_path)
    except json.JSONDecodeError as error:
        records, errors = [], [{ERROR_KEY: f"its records file is not JSON lines ({error})"}]
    result = {"section": name, "status": "ok", "seconds": time.monotonic() - started, "limit_s": limit_s}
    if code is None:
        result.update(status="timeout", error=f"ran past its {limit_s:.0f} s limit and was killed")
    elif errors:
        result.update(status="error", error=errors[-1][ERROR_KEY], traceback=errors[-1].get("traceback"))
    elif code != 0:
        result.update(status="error", error=f"its process exited with code {code}")
    if result["status"] != "ok":
        result["log_tail"] = _tail(log_path)
    result["records"] = records
    return result


def skipped(name: str, left_s: float) -> dict:
    return {
        "section": name,
        "status": "skipped",
        "seconds": 0.0,
        "limit_s": 0.0,
        "error": f"only {max(left_s, 0.0):.0f} s of the total budget were left (a section needs {MIN_SECTION_S:.0f})",
        "records": [],
    }


def build_tables(results: list[dict]) -> dict[str, list[dict]]:
    """One table per kind: op records (graph-captured ones apart) and the e2e prefill rows, each
    record tagged with the section it came from."""
    tables = {name: [] for name in TABLE_COLUMNS}
    for result in results:
        for record in result["records"]:
            record = {"section": result["section"], **record}
            if result["section"] == "e2e":
                tables["e2e_prefill"].append(record)
            elif record.get("cuda_graph"):
                tables["iaf_cuda_graph"].append(record)
            else:
                tables["ops"].append(record)
    return tables


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return "" if value is None else str(value)


def format_table(records: list[dict], columns) -> str:
    """A plain-text table of the ``columns`` that at least one record has."""
    columns = [column for column in columns if any(column in record for record in records)]
    if not columns:
        return ""
    rows = [[_cell(record.get(column)) for column in columns] for record in records]
    widths = [max(len(column), *(len(row[i]) for row in rows)) for i, column in enumerate(columns)]
    lines = ["  ".join(column.ljust(width) for column, width in zip(columns, widths))]
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def write_results(out_dir: Path, environment: dict, budget: dict, results: list[dict], wall_s: float) -> Path:
    """Write ``gpu-<device>-<stamp>.json`` (atomically) into ``out_dir``; returns its path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    device = "".join(c if c.isalnum() or c in "-_." else "-" for c in environment["device"])
    stamp = environment["date"][:19].replace(":", "").replace("-", "")
    path = out_dir / f"gpu-{device}-{stamp}.json"
    document = {
        "benchmark": "gpu",
        "environment": environment,
        "budget": budget,
        "wall_s": wall_s,
        "tables": build_tables(results),
        "sections": [{k: v for k, v in r.items() if k != "records"} | {"records": len(r["records"])} for r in results],
    }
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(document, indent=2, default=str))
    tmp.replace(path)
    return path


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results")
    parser.add_argument(
        "--total-budget", type=float, default=TOTAL_BUDGET_S, help="seconds for the whole command (default 450)"
    )
    parser.add_argument(
        "--budget",
        type=parse_budget,
        action="append",
        default=[],
        metavar="NAME=SECONDS",
        help=f"a section's limit (defaults: {', '.join(f'{k}={v}' for k, v in SECTION_BUDGETS_S.items())})",
    )
    parser.add_argument("--e2e-models", nargs="+", choices=["qwen3_vl", "medgemma"], default=["qwen3_vl"])
    parser.add_argument("--e2e-slices", nargs="+", type=int, default=[64, 256])
    parser.add_argument(
        "--e2e-scale", choices=["full", "tiny"], default="full", help="published configs or the smoke-test models"
    )
    parser.add_argument("--e2e-repeats", type=int, default=3)
    parser.add_argument("--e2e-gamma", type=float, default=0.05)
    parser.add_argument(
        "--e2e-tau",
        nargs="+",
        type=float,
        default=[0.9, 0.05],
        help="pruned rows at each tau: the paper's 0.9 keeps most tokens of random weights, 0.05 a few %%",
    )
    parser.add_argument("--child", choices=SECTIONS, help=argparse.SUPPRESS)
    parser.add_argument("--records", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not args.total_budget > 0:
        parser.error(f"--total-budget must be positive, got {args.total_budget}")
    if args.e2e_repeats < 1:
        parser.error(f"--e2e-repeats must be at least 1, got {args.e2e_repeats}")
    if any(depth < 1 for depth in args.e2e_slices):
        parser.error(f"--e2e-slices must be positive, got {args.e2e_slices}")
    if (args.child is None) != (args.records is None):
        parser.error("--child and --records go together")
    return args


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv=None) -> int:
    started = time.monotonic()  # the budget counts the parent's own start-up (torch import, CUDA query)
    args = parse_args(argv)
    if args.child is not None:
        return stream_records(section_records(args.child, args), args.records)
    if not cuda_available():
        print(
            "bench/gpu.py needs a CUDA GPU (torch.cuda.is_available() is False); "
            "on CPU run `pytest bench --benchmark-only` and `python bench/e2e.py --smoke`",
            file=sys.stderr,
        )
        return 2
    from _common import environment

    budgets = SECTION_BUDGETS_S | dict(args.budget)
    deadline = started + args.total_budget
    env = environment()
    results = []
    with tempfile.TemporaryDirectory(prefix="medpruner-gpu-bench-") as scratch:
        for name in args.sections:
            limit = section_limit(budgets[name], deadline, time.monotonic())
            if limit is None:
                results.append(skipped(name, deadline - time.monotonic()))
            else:
                print(f"[{name}] up to {limit:.0f} s", flush=True)
                command = section_command(name, Path(scratch, f"{name}.jsonl"), args)
                results.append(
                    run_section(name, command, limit, Path(scratch, f"{name}.jsonl"), Path(scratch, f"{name}.log"))
                )
            result = results[-1]
            print(
                f"[{name}] {result['status']}: {len(result['records'])} records in {result['seconds']:.0f} s"
                + (f" ({result['error']})" if result["status"] != "ok" else ""),
                flush=True,
            )
    budget = {"total_s": args.total_budget, "sections_s": {name: budgets[name] for name in args.sections}}
    path = write_results(args.out, env, budget, results, time.monotonic() - started)
    for table, records in build_tables(results).items():
        if records:
            print(f"\n{table}\n{format_table(records, TABLE_COLUMNS[table])}")
    print(f"\nwrote {path}")
    return 0 if all(result["status"] == "ok" for result in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
