"""The eval's outputs beside the per-sample JSONL: ``summary.json``, the plots (PNG, matplotlib Agg) and a
self-contained ``report.html`` (the plots embedded).

Plots:

* ``pareto.png``: per method, the primary metric (accuracy for closed questions, else token F1, with its
  bootstrap interval) and the fidelity to the unpruned model (answer agreement, first-token KL) against
  the mean visual-token retention; the Pareto front (no other method is better at lower or equal
  retention) is drawn through the methods on it;
* ``category_deltas.png``: per pruned method, the accuracy change against the unpruned model for each
  category, categories ordered by frequency (rarest first, their share of the labelled samples shown).
"""

from __future__ import annotations

import html
from pathlib import Path

from medpruner.report import _base64, _figure, _png, atomic_write_bytes, atomic_write_text, environment, to_json

__all__ = ["pareto_front", "plot_category_deltas", "plot_pareto", "render_html", "write_report"]

REPORT_NAME = "report.html"
MAX_FLIPS_SHOWN = 50


def pareto_front(points: list[tuple[str, float, float]]) -> list[str]:
    """Names of the points ``(name, retention, score)`` that no other point dominates (retention lower
    or equal and score higher or equal, one of them strictly), ordered by retention."""
    front = []
    for name, x, y in points:
        dominated = any(
            (x2 <= x and y2 >= y) and (x2 < x or y2 > y) for other, x2, y2 in points if other != name
        )
        if not dominated:
            front.append((x, name))
    return [name for _, name in sorted(front)]


def _points(summary: dict, value) -> list[tuple[str, float, float]]:
    points = []
    for name, entry in summary["methods"].items():
        x, y = entry["retention"]["overall"], value(name, entry)
        if x is not None and y is not None:
            points.append((name, float(x), float(y)))
    return points


def _colours(summary: dict) -> dict[str, tuple]:
    """One colour per method, the same in every plot (tab20: distinct for up to 20 methods)."""
    from matplotlib import colormaps

    palette = colormaps["tab20"]
    return {name: palette(i % 20) for i, name in enumerate(summary["methods"])}


def _metric(name, entry):
    stats = entry["metrics"]["overall"].get(entry["primary_metric"])
    return None if stats is None or stats["n"] == 0 else stats["mean"]


def _fidelity_value(key):
    def value(name, entry):
        if name == "none":
            return {"answer_agreement": 1.0, "first_token_kl": 0.0}[key]
        fidelity = entry.get("audit", {}).get("fidelity")
        return None if fidelity is None else fidelity[key]

    return value


def plot_pareto(summary: dict) -> bytes:
    """Three panels against retention: the primary metric, answer agreement, first-token KL."""
    figure = _figure(15, 4.6)
    panels = [
        (_metric, "primary", True),
        (_fidelity_value("answer_agreement"), "answer agreement with the unpruned model", True),
        (_fidelity_value("first_token_kl"), "first-token KL to the unpruned model (nats)", False),
    ]
    primary = next(iter(summary["methods"].values()))["primary_metric"] if summary["methods"] else "accuracy"
    colours = _colours(summary)
    for column, (value, label, higher_better) in enumerate(panels):
        axis = figure.add_subplot(1, 3, column + 1)
        points = _points(summary, value)
        for name, x, y in points:
            error = None
            if column == 0:
                stats = summary["methods"][name]["metrics"]["overall"][primary]
                if stats["ci_low"] is not None:
                    error = [[y - stats["ci_low"]], [stats["ci_high"] - y]]
            axis.errorbar([x], [y], yerr=error, fmt="o", capsize=3, label=name, color=colours[name])
            axis.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        if points:
            signed = [(n, x, y if higher_better else -y) for n, x, y in points]
            front = pareto_front(signed)
            by_name = {n: (x, y) for n, x, y in points}
            axis.plot([by_name[n][0] for n in front], [by_name[n][1] for n in front], "k--", lw=1,
                      label="Pareto front")
        axis.set_xlabel("visual-token retention (kept / all)")
        axis.set_ylabel(primary if column == 0 else label)
        axis.grid(alpha=0.3)
        if column == 0:
            axis.legend(fontsize=7, loc="best")
    figure.suptitle("accuracy and fidelity against retention, per method (matched budgets)")
    return _png(figure)


def plot_category_deltas(summary: dict) -> bytes | None:
    """Grouped bars of the accuracy delta per category (rarest first); None without labelled categories."""
    methods = [(n, e["audit"]["category_deltas"]) for n, e in summary["methods"].items()
               if e.get("audit") and e["audit"]["category_deltas"]]
    if not methods:
        return None
    categories = {}
    for _, rows in methods:
        for row in rows:
            categories.setdefault(row["category"], (row["n"], row["frequency"]))
    order = sorted(categories, key=lambda c: (categories[c][0], c))
    figure = _figure(max(6.0, 1.2 * len(order) + 2), 4.2)
    axis = figure.add_subplot(1, 1, 1)
    width = 0.8 / len(methods)
    colours = _colours(summary)
    for i, (name, rows) in enumerate(methods):
        delta = {row["category"]: row["delta"] for row in rows}
        xs = [k + (i - (len(methods) - 1) / 2) * width for k in range(len(order))]
        axis.bar(xs, [delta.get(c, 0.0) for c in order], width=width, label=name, color=colours[name])
    axis.axhline(0.0, color="k", lw=0.8)
    axis.set_xticks(range(len(order)))
    axis.set_xticklabels([f"{c}\n{100 * categories[c][1]:.0f}% (n={categories[c][0]})" for c in order], fontsize=8)
    axis.set_ylabel("accuracy - unpruned accuracy")
    axis.set_xlabel("category (rarest first; share of labelled samples)")
    axis.legend(fontsize=7, ncol=2)
    axis.grid(axis="y", alpha=0.3)
    return _png(figure)


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return html.escape(str(value))


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def render_html(summary: dict, images: dict[str, bytes]) -> str:
    methods = summary["methods"]
    primary = next(iter(methods.values()))["primary_metric"] if methods else "accuracy"
    rows = []
    for name, entry in methods.items():
        stats = entry["metrics"]["overall"].get(primary, {})
        fidelity = entry.get("audit", {}).get("fidelity", {})
        retention = entry["retention"]
        interval = "-" if stats.get("ci_low") is None else f"[{stats['ci_low']:.3f}, {stats['ci_high']:.3f}]"
        rows.append([name, entry["n"], stats.get("mean"), interval, retention["overall"], retention["slice_stage"],
                     retention["token_stage"], retention["tokens_kept"], retention["slices_kept"],
                     entry["budget_match"]["max_abs_gap"], fidelity.get("answer_agreement"),
                     fidelity.get("first_token_kl"), fidelity.get("top1_agreement")])
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>medpruner eval</title><style>"
        "body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px;text-align:right}th{background:#eee}"
        "td:first-child{text-align:left}img{max-width:100%}</style></head><body>",
        "<h1>medpruner eval</h1>",
        f"<p>model: {html.escape(str(summary.get('model')))}; dataset: "
        f"{html.escape(str(summary['dataset']['file']))} ({html.escape(summary['dataset']['format'])}); "
        f"{summary['dataset']['samples']} samples read, {summary['dataset']['skipped']} rows skipped, "
        f"{len(summary.get('failed_samples', []))} volumes failed to load; settings {summary.get('settings_id')}</p>",
    ]
    if summary.get("methods_added"):
        parts.append(f"<p>added to the run: {html.escape(', '.join(summary['methods_added']))} (the unpruned "
                     "reference of the audit, and the adaptive MedPruner whose kept count is every budgeted "
                     "method's budget)</p>")
    parts += [
        "<h2>Methods at matched budgets</h2>",
        _table([
            "method", "n", primary, "95% CI", "retention", "slice stage", "token stage", "tokens kept",
            "slices kept", "max |kept - budget|", "answer agreement", "first-token KL", "top-1 agreement",
        ], rows),
    ]
    if "pareto" in images:
        parts.append(f"<img alt='accuracy and fidelity against retention' src='data:image/png;base64,"
                     f"{_base64(images['pareto'])}'>")
    parts.append("<h2>Audit: accuracy change per category (rarest first)</h2>")
    if "category_deltas" in images:
        parts.append(f"<img alt='per-category accuracy deltas' src='data:image/png;base64,"
                     f"{_base64(images['category_deltas'])}'>")
    for name, entry in methods.items():
        deltas = entry.get("audit", {}).get("category_deltas")
        if deltas:
            parts.append(f"<h3>{html.escape(name)}</h3>")
            parts.append(_table(["category", "n", "frequency", "unpruned accuracy", "pruned accuracy", "delta"],
                                [[d["category"], d["n"], d["frequency"], d["reference_accuracy"],
                                  d["pruned_accuracy"], d["delta"]] for d in deltas]))
    parts.append("<h2>Audit: answers that flip under pruning</h2>")
    flip_rows = []
    for name, entry in methods.items():
        for flip in entry.get("audit", {}).get("answer_flips", []):
            flip_rows.append([name, flip["sample_id"], flip["category"], flip["kind"], flip["reference_prediction"],
                              flip["pruned_prediction"], " ".join(map(str, flip["kept_slices"]))])
    total = len(flip_rows)
    parts.append(f"<p>{total} flips" + (f" (first {MAX_FLIPS_SHOWN} shown; all in summary.json)" if
                                          total > MAX_FLIPS_SHOWN else "") + "</p>")
    parts.append(_table(["method", "sample", "category", "kind", "unpruned answer", "pruned answer", "kept slices"],
                        flip_rows[:MAX_FLIPS_SHOWN]))
    parts.append("<h2>Audit: fidelity to the unpruned model per category</h2>")
    fid_rows = []
    for name, entry in methods.items():
        fidelity = entry.get("audit", {}).get("fidelity")
        for category, values in (fidelity or {}).get("by_category", {}).items():
            fid_rows.append([name, category, values["n"], values["answer_agreement"], values["first_token_kl"],
                             values["top1_agreement"]])
    parts.append(_table(["method", "category", "n", "answer agreement", "first-token KL", "top-1 agreement"],
                        fid_rows))
    skipped = summary["dataset"].get("skipped_rows", []) + [
        {"row": f["source"], "reason": f["reason"]} for f in summary.get("failed_samples", [])
    ]
    if skipped:
        parts.append("<h2>Rows skipped</h2>")
        parts.append(_table(["row", "reason"], [[s["row"], s["reason"]] for s in skipped]))
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(out_dir, summary: dict, *, html: bool = True) -> dict[str, Path]:
    """Write ``summary.json`` (with the environment), and with ``html`` the plots and ``report.html``.
    Returns the paths written."""
    from medpruner.eval.runner import SUMMARY_NAME

    out_dir = Path(out_dir)
    summary.setdefault("environment", environment())
    paths = {"summary": atomic_write_text(out_dir / SUMMARY_NAME, to_json(summary))}
    if html:
        images = {"pareto": plot_pareto(summary)}
        deltas = plot_category_deltas(summary)
        if deltas is not None:
            images["category_deltas"] = deltas
        for name, data in images.items():
            paths[name] = atomic_write_bytes(out_dir / f"{name}.png", data)
        paths["report"] = atomic_write_text(out_dir / REPORT_NAME, render_html(summary, images))
    return paths
