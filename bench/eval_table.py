"""The accuracy-against-retention table of ``medpruner eval`` runs, as Markdown, from their summary.json
files, and optionally the plot of every method's accuracy against its retention across the runs.

    python bench/eval_table.py bench/results/tiny-vqa-eval-*/summary.json [--plot accuracy.png]

One row per method and run: accuracy with its bootstrap 95% interval, the mean retention (visual tokens
kept / visual tokens of the volume) split into its slice and token stages, the fidelity to the unpruned
model (answer agreement, first-token KL), and the cost (slices through the vision tower as deployed, the
median measured prefill seconds, the modelled prefill of Qwen3-VL-8B at an H100 roofline), with a star on
the methods of the Pareto front over every method and run (accuracy against modelled prefill). Several
summaries (runs at other tau or gamma) give one block of rows each, headed by the run's settings. Rows
keep the summary's method order. ``--cost-plot`` draws accuracy against the modelled prefill for every
method and run, with that front.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _cell(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


COST_CONFIG = "qwen3-vl-8b"


def _modelled_ms(entry: dict) -> float | None:
    return ((entry.get("cost") or {}).get("modelled") or {}).get(COST_CONFIG, {}).get("ms")


def pareto(summaries: list[dict]) -> set[tuple[int, str]]:
    """(run index, method) on the front of accuracy against modelled prefill over every run: no other
    point is as accurate or more at no higher cost, one of them strictly."""
    points = []
    for run, summary in enumerate(summaries):
        for name, entry in summary["methods"].items():
            stats = entry["metrics"]["overall"].get("accuracy") or {}
            cost = _modelled_ms(entry)
            if stats.get("mean") is not None and cost is not None:
                points.append(((run, name), cost, stats["mean"]))
    from medpruner.eval.report import pareto_front

    return set(pareto_front(points))


def table(summary: dict, front: set[str] | None = None) -> str:
    """Markdown rows of one summary (``front``: its methods on the Pareto front, starred)."""
    settings = summary["settings"]
    front = front or set()
    lines = [
        f"gamma {settings['gamma']}, tau {settings['tau']}, {summary['dataset']['samples']} questions, "
        f"model: {summary['model']}",
        "",
        "| method | accuracy [95% CI] | retention | slice stage | token stage | agreement | first-token KL "
        f"| slices encoded | measured s | {COST_CONFIG} ms |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, entry in summary["methods"].items():
        stats = entry["metrics"]["overall"].get("accuracy") or {}
        interval = (f"[{stats['ci_low']:.3f}, {stats['ci_high']:.3f}]"
                    if stats.get("ci_low") is not None else "")
        fidelity = entry.get("audit", {}).get("fidelity", {})
        retention = entry["retention"]
        cost = entry.get("cost") or {}
        star = " *" if name in front else ""
        lines.append(
            f"| {name}{star} | {_cell(stats.get('mean'))} {interval} | {_cell(retention['overall'])} | "
            f"{_cell(retention['slice_stage'])} | {_cell(retention['token_stage'])} | "
            f"{_cell(fidelity.get('answer_agreement'))} | {_cell(fidelity.get('first_token_kl'), 4)} | "
            f"{_cell(cost.get('slices_encoded'), 1)} | {_cell((cost.get('seconds_median') or {}).get('total'))} | "
            f"{_cell(_modelled_ms(entry), 1)} |"
        )
    return "\n".join(lines)


def cost_plot(summaries: list[dict], path: Path) -> None:
    """Accuracy (95% interval) against the modelled prefill of every method and run; one colour and
    marker per method (one legend), the runs of a method joined, the Pareto front over all dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from medpruner.eval.cost_report import dodge

    front = pareto(summaries)
    # coincident points of a run (methods at one cost and score) side by side, so none hides another
    shifted = {}
    for run, summary in enumerate(summaries):
        points = [((run, name), _modelled_ms(entry), (entry["metrics"]["overall"]["accuracy"]["mean"],))
                  for name, entry in summary["methods"].items()
                  if _modelled_ms(entry) is not None and (entry["metrics"]["overall"].get("accuracy") or {}).get("mean")
                  is not None]
        shifted.update(dodge(points))
    figure, axis = plt.subplots(figsize=(9.5, 5.2))
    colours, markers = plt.get_cmap("tab20").colors, "osD^v<>pPX*h"
    names = list(dict.fromkeys(name for s in summaries for name in s["methods"]))
    on_front = []
    for number, name in enumerate(names):
        rows = []
        for run, summary in enumerate(summaries):
            entry = summary["methods"].get(name)
            stats = (entry or {}).get("metrics", {}).get("overall", {}).get("accuracy") or {}
            cost = None if entry is None else _modelled_ms(entry)
            if cost is None or stats.get("ci_low") is None:
                continue
            rows.append((shifted[(run, name)], stats["mean"], stats["ci_low"], stats["ci_high"]))
            if (run, name) in front:
                on_front.append((cost, stats["mean"]))
        if not rows:
            continue
        rows.sort()
        x, y, low, high = (list(column) for column in zip(*rows, strict=True))
        axis.errorbar(x, y, yerr=[[m - lo for m, lo in zip(y, low, strict=True)],
                                  [hi - m for m, hi in zip(y, high, strict=True)]],
                      color=colours[(2 * number) % 20 + (number // 10) % 2], marker=markers[number % len(markers)],
                      markersize=6, capsize=2, linewidth=1, label=name)
    if len(on_front) > 1:
        xs, ys = zip(*sorted(on_front), strict=True)
        axis.plot(xs, ys, linestyle="--", color="0.3", linewidth=1.2, zorder=0, label="Pareto front")
    axis.set_xlabel(f"modelled prefill, {COST_CONFIG} (ms, H100 roofline)")
    axis.set_ylabel("accuracy (95% bootstrap interval)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=9, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot(summaries: list[dict], path: Path) -> None:
    """Per method, its (retention, accuracy) point of each run with the 95% interval, joined in
    retention order: methods at matched budgets share a retention in each run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points: dict[str, list[tuple[float, float, float, float]]] = {}
    for summary in summaries:
        for name, entry in summary["methods"].items():
            stats = entry["metrics"]["overall"].get("accuracy") or {}
            if stats.get("ci_low") is None or entry["retention"]["overall"] is None:
                continue
            points.setdefault(name, []).append(
                (entry["retention"]["overall"], stats["mean"], stats["ci_low"], stats["ci_high"]))
    figure, axis = plt.subplots(figsize=(7.5, 5))
    # 12 methods outrun the default 10-colour cycle: 20 colours and a marker per method keep them apart
    colours, markers = plt.get_cmap("tab20").colors, "osD^v<>pPX*h"
    for number, (name, rows) in enumerate(points.items()):
        rows.sort()
        x, y, low, high = (list(column) for column in zip(*rows, strict=True))
        axis.errorbar(x, y, yerr=[[m - lo for m, lo in zip(y, low, strict=True)],
                                  [hi - m for m, hi in zip(y, high, strict=True)]],
                      color=colours[(2 * number) % 20 + (number // 10) % 2], marker=markers[number % len(markers)],
                      markersize=4, capsize=2, linewidth=1, label=name)
    axis.set_xlabel("retention (visual tokens kept / visual tokens)")
    axis.set_ylabel("accuracy (95% bootstrap interval)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("summaries", nargs="+", type=Path, help="summary.json of medpruner eval runs")
    parser.add_argument("--plot", type=Path, default=None, help="also draw accuracy against retention to this PNG")
    parser.add_argument("--cost-plot", type=Path, default=None,
                        help="also draw accuracy against the modelled prefill (every method and run) to this PNG")
    args = parser.parse_args(argv)
    summaries = []
    for path in args.summaries:
        try:
            summaries.append(json.loads(path.read_text(encoding="utf-8")))
            summaries[-1]["methods"], summaries[-1]["settings"], summaries[-1]["dataset"]  # noqa: B018
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
            parser.error(f"{path}: not a medpruner eval summary ({type(err).__name__}: {err})")
    front = pareto(summaries)
    try:
        blocks = [table(summary, {name for run, name in front if run == i}) for i, summary in enumerate(summaries)]
    except KeyError as err:
        parser.error(f"not a medpruner eval summary (KeyError: {err})")
    print("\n\n".join(blocks))
    if any(front):
        print(f"\n* on the Pareto front of accuracy against the modelled {COST_CONFIG} prefill over every run")
    if args.plot is not None:
        plot(summaries, args.plot)
    if args.cost_plot is not None:
        cost_plot(summaries, args.cost_plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
