"""Plots drawn from saved results only (never from a fresh run), so a figure always matches a committed
JSON.

    python bench/plot.py bench/results/cpu-2core-2026-11-23.json      # pytest-benchmark: one panel per group
    python bench/plot.py bench/results/e2e-<stamp>.json               # bench/e2e.py: prefill vs slices
    python bench/plot.py bench/results/gpu-<device>-<stamp>.json      # bench/gpu.py: ops vs floor, prefill

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
    """Prefill time against slice count, one line per variant (unpatched, then paper and fast at each
    tau), one panel per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for row in record["rows"] if row.get("status") == "ok"]
    models = sorted({row["model"] for row in rows})
    if not models:
        raise ValueError("the e2e record has no successful rows to plot")
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 3.5), squeeze=False)
    for ax, model in zip(axes[0], models):
        lines = sorted({(r["variant"] != "unpatched", r["variant"], r.get("tau")) for r in rows if r["model"] == model})
        for _, variant, tau in lines:
            mine = [r for r in rows if r["model"] == model and r["variant"] == variant and r.get("tau") == tau]
            points = sorted((r["slices"], r["prefill_ms"]) for r in mine)
            ax.plot(*zip(*points), marker="o", label=variant if tau is None else f"{variant} tau={tau:g}")
        ax.set_xlabel("slices")
        ax.set_ylabel("prefill ms")
        ax.set_title(model, fontsize=9)
        ax.legend(fontsize=8)
    env = record.get("environment", {})
    fig.suptitle(f"{env.get('device', '')} {env.get('date', '')[:10]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def _op_label(record: dict) -> str:
    shape = "x".join(map(str, record["shape"])) if "shape" in record else record.get("config", "")
    parts = (record.get("op", "?"), shape, record.get("dtype"), record.get("regime"))
    return " ".join(str(part) for part in parts if part)


def plot_gpu(document: dict, out: Path) -> None:
    """A bench/gpu.py result: each op record's time as a multiple of its floor (or its ms where it has
    no floor), the graph-captured IAF included; the e2e prefill rows go to ``<out stem>-e2e.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tables = document["tables"]
    records = [(r, "replayed graph") for r in tables["iaf_cuda_graph"]] + [(r, "") for r in tables["ops"]]
    records = [(r, how) for r, how in records if r.get("ms") is not None]
    if not records and not any(row.get("status") == "ok" for row in tables["e2e_prefill"]):
        raise ValueError("the gpu record has no op or e2e rows to plot (see its 'sections' for the errors)")
    if records:
        floored = [(r, how) for r, how in records if r.get("ratio_to_floor") is not None]
        panels = [p for p in (("x floor", floored, "ratio_to_floor"), ("ms", records, "ms")) if p[1]]
        height = sum(0.25 * len(rows) + 1 for _, rows, _ in panels)
        fig, axes = plt.subplots(len(panels), 1, figsize=(9, height), squeeze=False)
        for ax, (unit, rows, key) in zip(axes[:, 0], panels):
            ax.barh([f"{_op_label(r)} {how}".strip() for r, how in rows], [r[key] for r, _ in rows], color="tab:blue")
            if key == "ratio_to_floor":
                ax.axvline(1.0, color="0.3", linewidth=1)
            else:
                ax.set_xscale("log")
            ax.set_xlabel(unit)
            ax.tick_params(labelsize=7)
        env = document.get("environment", {})
        fig.suptitle(f"{env.get('device', '')} {env.get('date', '')[:10]} {env.get('git_commit') or ''}", fontsize=9)
        fig.tight_layout()
        fig.savefig(out, dpi=120)
        plt.close(fig)
    if any(row.get("status") == "ok" for row in tables["e2e_prefill"]):
        e2e = {"rows": tables["e2e_prefill"], "environment": document.get("environment", {})}
        plot_e2e(e2e, out.with_name(f"{out.stem}-e2e.png"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="a pytest-benchmark, bench/e2e.py or bench/gpu.py JSON")
    parser.add_argument("--out", type=Path, help="PNG path (default: next to the JSON)")
    args = parser.parse_args(argv)
    data = json.loads(args.results.read_text())
    out = args.out or args.results.with_suffix(".png")
    if "benchmarks" in data:
        plot_microbenchmarks(data, out)
    elif data.get("benchmark") == "e2e":
        plot_e2e(data, out)
    elif data.get("benchmark") == "gpu":
        plot_gpu(data, out)
    else:
        raise SystemExit(f"{args.results}: not a pytest-benchmark, bench/e2e.py or bench/gpu.py result file")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
