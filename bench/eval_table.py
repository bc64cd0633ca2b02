"""The accuracy-against-retention table of ``medpruner eval`` runs, as Markdown, from their summary.json
files, and optionally the plot of every method's accuracy against its retention across the runs.

    python bench/eval_table.py bench/results/tiny-vqa-eval-*/summary.json [--plot accuracy.png]

One row per method and run: accuracy with its bootstrap 95% interval, the mean retention (visual tokens
kept / visual tokens of the volume) split into its slice and token stages, and the fidelity to the
unpruned model (answer agreement, first-token KL). Several summaries (runs at other tau or gamma) give
one block of rows each, headed by the run's settings. Rows keep the summary's method order.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _cell(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(summary: dict) -> str:
    """Markdown rows of one summary."""
    settings = summary["settings"]
    lines = [
        f"gamma {settings['gamma']}, tau {settings['tau']}, {summary['dataset']['samples']} questions, "
        f"model: {summary['model']}",
        "",
        "| method | accuracy [95% CI] | retention | slice stage | token stage | agreement | first-token KL |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, entry in summary["methods"].items():
        stats = entry["metrics"]["overall"].get("accuracy") or {}
        interval = (f"[{stats['ci_low']:.3f}, {stats['ci_high']:.3f}]"
                    if stats.get("ci_low") is not None else "")
        fidelity = entry.get("audit", {}).get("fidelity", {})
        retention = entry["retention"]
        lines.append(
            f"| {name} | {_cell(stats.get('mean'))} {interval} | {_cell(retention['overall'])} | "
            f"{_cell(retention['slice_stage'])} | {_cell(retention['token_stage'])} | "
            f"{_cell(fidelity.get('answer_agreement'))} | {_cell(fidelity.get('first_token_kl'), 4)} |"
        )
    return "\n".join(lines)


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
    args = parser.parse_args(argv)
    blocks, summaries = [], []
    for path in args.summaries:
        try:
            summaries.append(json.loads(path.read_text(encoding="utf-8")))
            blocks.append(table(summaries[-1]))
        except (OSError, json.JSONDecodeError, KeyError) as err:
            parser.error(f"{path}: not a medpruner eval summary ({type(err).__name__}: {err})")
    print("\n\n".join(blocks))
    if args.plot is not None:
        plot(summaries, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
