"""The accuracy-against-retention table of ``medpruner eval`` runs, as Markdown, from their summary.json files.

    python bench/eval_table.py bench/results/tiny-vqa-eval-2026-11-29/summary.json [more summaries ...]

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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("summaries", nargs="+", type=Path, help="summary.json of medpruner eval runs")
    args = parser.parse_args(argv)
    blocks = []
    for path in args.summaries:
        try:
            blocks.append(table(json.loads(path.read_text(encoding="utf-8"))))
        except (OSError, json.JSONDecodeError, KeyError) as err:
            parser.error(f"{path}: not a medpruner eval summary ({type(err).__name__}: {err})")
    print("\n\n".join(blocks))
    return 0


if __name__ == "__main__":
    sys.exit(main())
