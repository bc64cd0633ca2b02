"""Plots drawn from saved results only (never from a fresh run), so a figure always matches a committed
JSON.

    python bench/plot.py bench/results/cpu-2core-2026-11-23.json      # pytest-benchmark: one panel per group
    python bench/plot.py bench/results/e2e-<stamp>.json               # bench/e2e.py: prefill vs slices

Writes ``<input stem>.png`` next to the JSON (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def plot_microbenchmarks(run: dict, out: Path) -> None:
    """Median time per test with its min..max range, one horizontal-bar panel per benchmark group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[str, list[dict]] = {}
    for bench in run["benchmarks"]:
        groups.setdefault(bench["group"], []).append(bench)
    fig, axes = plt.subplots(len(groups), 1, figsize=(9, 2.2 * len(groups)), squeeze=False)
    for ax, (group, benches) in zip(axes[:, 0], sorted(groups.items())):
        benches = sorted(benches, key=lambda b: b["stats"]["median"])
        names = [b["name"].removeprefix("test_") for b in benches]
        median = [1e3 * b["stats"]["median"] for b in benches]
        low = [m - 1e3 * b["stats"]["min"] for m, b in zip(median, benches)]
        high = [1e3 * b["stats"]["max"] - m for m, b in zip(median, benches)]
        ax.barh(names, median, xerr=[low, high], color="tab:blue", ecolor="0.4", capsize=3)
        ax.set_xlabel("ms (median, min..max)")
        ax.set_title(group, fontsize=9)
        ax.tick_params(labelsize=8)
    fig.suptitle(f"{run['machine_info'].get('cpu', {}).get('brand_raw', '')} {run['datetime'][:10]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def plot_e2e(record: dict, out: Path) -> None:
    """Prefill time against slice count, one line per variant (unpatched, paper, fast), one panel per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for row in record["rows"] if row.get("status") == "ok"]
    models = sorted({row["model"] for row in rows})
    if not models:
        raise ValueError("the e2e record has no successful rows to plot")
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 3.5), squeeze=False)
    for ax, model in zip(axes[0], models):
        for variant in ("unpatched", "paper", "fast"):
            mine = [r for r in rows if r["model"] == model and r["variant"] == variant]
            points = sorted((r["slices"], r["prefill_ms"]) for r in mine)
            if points:
                ax.plot(*zip(*points), marker="o", label=variant)
        ax.set_xlabel("slices")
        ax.set_ylabel("prefill ms")
        ax.set_title(model, fontsize=9)
        ax.legend(fontsize=8)
    env = record.get("environment", {})
    fig.suptitle(f"{env.get('device', '')} {env.get('date', '')[:10]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="a pytest-benchmark JSON or a bench/e2e.py JSON")
    parser.add_argument("--out", type=Path, help="PNG path (default: next to the JSON)")
    args = parser.parse_args(argv)
    data = json.loads(args.results.read_text())
    out = args.out or args.results.with_suffix(".png")
    if "benchmarks" in data:
        plot_microbenchmarks(data, out)
    elif data.get("benchmark") == "e2e":
        plot_e2e(data, out)
    else:
        raise SystemExit(f"{args.results}: neither a pytest-benchmark nor a bench/e2e.py result file")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
