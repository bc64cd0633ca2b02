"""CPU regression guard for CI: ratios to the eager baseline measured in the same run, never absolute
times (CI machines differ and share their cores).

    python bench/guard.py                 # run the CPU benchmarks, compare with bench/baseline_cpu.json
    python bench/guard.py --json run.json # compare an existing pytest-benchmark JSON
    python bench/guard.py --update --json a.json b.json c.json   # baseline: the worst ratio of each

The baseline keeps the worst (largest) ratio seen over several runs: on a shared machine a single run's
eager loop may be slow by chance, which would make every ratio look better than it is.

A guard run is ``--rounds`` (2) interleaved passes over the benchmarks. Each ratio takes the minimum time
of its test and of its eager baseline over every pass; the spread of the per-pass ratios is this run's
own noise. A ratio fails only when it is past both the tolerance and that noise: a busy neighbour that
slows one pass widens the allowance of that run instead of failing it, while a real regression slows
every pass and fails.

In every benchmark group one test is the eager baseline (its name contains ``eager`` or
``sort_cumsum_scatter``); each of our backends' tests (``..._backend[...]``; floors and third-party
references such as SDPA are not guarded) gets the ratio ``min(test) / min(baseline)`` (the minimum is the
statistic least disturbed by other work on the machine). The guard fails when a ratio grows by more
than ``--tolerance`` (30 %) over the committed baseline's.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
BASELINE = BENCH_DIR / "baseline_cpu.json"
EAGER_MARKERS = ("eager", "sort_cumsum_scatter")


def run_benchmarks(path: Path) -> None:
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        str(BENCH_DIR),
        "-p",
        "no:cacheprovider",
        "--benchmark-only",
        f"--benchmark-json={path}",
    ]
    subprocess.run(command, check=True, cwd=BENCH_DIR.parent)


def minimum_times(runs: list[dict]) -> dict[str, dict[str, float]]:
    """``{group: {test: min over every run}}``."""
    groups: dict[str, dict[str, float]] = {}
    for run in runs:
        for bench in run["benchmarks"]:
            times = groups.setdefault(bench["group"], {})
            times[bench["name"]] = min(times.get(bench["name"], float("inf")), bench["stats"]["min"])
    return groups


def ratios(run: dict | list[dict]) -> dict[str, float]:
    """``{"group :: backend test": min(test) / min(eager baseline of its group)}``, the minima taken
    over one run or over a list of runs."""
    groups = minimum_times(run if isinstance(run, list) else [run])
    result = {}
    for group, times in sorted(groups.items()):
        eager = [name for name in times if any(marker in name for marker in EAGER_MARKERS)]
        if len(eager) != 1:
            raise ValueError(f"benchmark group {group!r} needs exactly one eager baseline, found {eager}")
        for name, seconds in sorted(times.items()):
            if "_backend[" in name:
                result[f"{group} :: {name}"] = seconds / times[eager[0]]
    return result


def noise(per_run: list[dict[str, float]]) -> dict[str, float]:
    """Per ratio, the spread of its per-run values in this guard run: ``max / min - 1`` (0 for one run)."""
    keys = set().union(*per_run) if per_run else set()
    spread = {}
    for key in keys:
        values = [r[key] for r in per_run if key in r]
        spread[key] = max(values) / min(values) - 1 if min(values) > 0 else 0.0
    return spread


def compare(current: dict[str, float], baseline: dict[str, float], tolerance: float,
            measured_noise: dict[str, float] | None = None) -> list[str]:
    """The keys whose ratio passed ``baseline * (1 + max(tolerance, noise of this run))``."""
    failures = []
    measured_noise = measured_noise or {}
    for key, ratio in current.items():
        if key not in baseline:
            print(f"new       {key}: {ratio:.3f} x eager (no baseline yet)")
            continue
        allowance = max(tolerance, measured_noise.get(key, 0.0))
        limit = baseline[key] * (1 + allowance)
        verdict = "SLOWER" if ratio > limit else "ok"
        print(f"{verdict:<9} {key}: {ratio:.3f} x eager (baseline {baseline[key]:.3f}, limit {limit:.3f}, "
              f"noise of this run {measured_noise.get(key, 0.0):.0%})")
        if ratio > limit:
            failures.append(key)
    for key in sorted(set(baseline) - set(current)):
        print(f"missing   {key}: in the baseline but not in this run")
        failures.append(key)
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--json", type=Path, nargs="+", help="existing pytest-benchmark JSON file(s) instead of a new run"
    )
    parser.add_argument("--baseline", type=Path, default=BASELINE)
    parser.add_argument("--tolerance", type=float, default=0.30)
    parser.add_argument("--update", action="store_true", help="write the baseline from this run")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved passes of a new run (default 2)")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")

    with tempfile.TemporaryDirectory() as tmp:
        paths = args.json
        if paths is None:
            paths = [Path(tmp) / f"run{i}.json" for i in range(args.rounds)]
            for path in paths:
                run_benchmarks(path)
        runs = [json.loads(path.read_text()) for path in paths]
    per_run = [ratios(run) for run in runs]
    if args.update:
        current = {key: max(r[key] for r in per_run if key in r) for key in set().union(*per_run)}
        record = {
            "machine": runs[0].get("machine_info", {}).get("cpu", {}).get("brand_raw"),
            "runs": [run.get("datetime") for run in runs],
            "ratios": dict(sorted(current.items())),
        }
        args.baseline.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {args.baseline} ({len(current)} ratios, worst of {len(runs)} run(s))")
        return 0
    baseline = json.loads(args.baseline.read_text())["ratios"]
    failures = compare(ratios(runs), baseline, args.tolerance, noise(per_run))
    if failures:
        print(f"{len(failures)} benchmark(s) regressed by more than {args.tolerance:.0%} relative to eager")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
