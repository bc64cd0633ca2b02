"""The eval's outputs beside the per-sample JSONL: ``summary.json``, the plots (PNG, matplotlib Agg) and a
self-contained ``report.html`` (the plots embedded).

Plots (methods and categories are rows, so their labels are tick labels and never overprint, however
many methods share a retention):

* ``pareto.png``: a dot plot, one row per method, sorted by retention (highest first) and within a
  retention by the primary metric (accuracy for closed questions, else token F1); panels: the
  visual-token retention, the primary metric with its bootstrap interval (the unpruned model's value as
  a dashed line), and the fidelity to the unpruned model (answer agreement, first-token KL). A method on
  the Pareto front (no other method scores higher at lower or equal retention) is marked with a star;
* ``category_deltas.png``: one panel per pruned method, the accuracy change against the unpruned model
  for each category with its 95% interval, categories by frequency (rarest on top, sample count and
  share beside the name); red: the interval lies below 0, blue: above.
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


def _primary(summary: dict) -> str:
    return next(iter(summary["methods"].values()))["primary_metric"] if summary["methods"] else "accuracy"


def _rows_by_retention(summary: dict) -> list[str]:
    """Methods with a retention, highest retention first, then the best primary metric first."""

    def key(name):
        entry = summary["methods"][name]
        metric = _metric(name, entry)
        return (-entry["retention"]["overall"], -(metric if metric is not None else -1.0), name)

    return sorted((n for n, e in summary["methods"].items() if e["retention"]["overall"] is not None), key=key)


def plot_pareto(summary: dict) -> bytes:
    """A sorted dot plot of the methods: retention, the primary metric with its interval, answer
    agreement and first-token KL, one row per method (see the module docstring)."""
    primary = _primary(summary)
    names = _rows_by_retention(summary)
    methods = summary["methods"]
    front = set(pareto_front(_points(summary, _metric)))
    colours = _colours(summary)
    figure = _figure(15, 1.4 + 0.42 * max(len(names), 2))
    axes = figure.subplots(1, 4, sharey=True, gridspec_kw={"width_ratios": [1, 1.6, 1.1, 1.1], "wspace": 0.08})
    ys = list(range(len(names)))[::-1]
    panels = [
        (lambda name, entry: entry["retention"]["overall"], "visual-token retention (kept / all)"),
        (_metric, f"{primary} (95% bootstrap interval)"),
        (_fidelity_value("answer_agreement"), "answer agreement with unpruned"),
        (_fidelity_value("first_token_kl"), "first-token KL to unpruned (nats)"),
    ]
    for axis, (value, label) in zip(axes, panels):
        starred = value is _metric
        for name, y in zip(names, ys):
            entry = methods[name]
            x = value(name, entry)
            if x is None:
                axis.text(0.02, y, "n/a", transform=axis.get_yaxis_transform(), va="center", fontsize=9, color="0.5")
                continue
            error = None
            if starred:
                stats = entry["metrics"]["overall"][primary]
                if stats.get("ci_low") is not None:
                    error = [[x - stats["ci_low"]], [stats["ci_high"] - x]]
            on_front = starred and name in front
            axis.errorbar([x], [y], xerr=error, fmt="*" if on_front else "o", markersize=12 if on_front else 7,
                          capsize=4, lw=1.6, color=colours[name])
        axis.set_xlabel(label, fontsize=10)
        axis.grid(axis="x", alpha=0.3)
        # Rows that share a retention form a block; a line separates the blocks.
        for upper, lower, y in zip(names, names[1:], ys[1:]):
            if round(methods[upper]["retention"]["overall"], 3) != round(methods[lower]["retention"]["overall"], 3):
                axis.axhline(y + 0.5, color="0.6", lw=0.8)
    reference = methods.get("none")
    if reference is not None and _metric("none", reference) is not None:
        axes[1].axvline(_metric("none", reference), color="0.3", ls="--", lw=1)
        axes[1].set_xlabel(f"{primary} (95% bootstrap interval; dashed: unpruned)", fontsize=10)
    axes[0].set_xlim(0, 1.05)
    axes[0].set_yticks(ys)
    axes[0].set_yticklabels([f"{name} *" if name in front else name for name in names], fontsize=10)
    for tick, name in zip(axes[0].get_yticklabels(), names):
        tick.set_color(colours[name])
    axes[0].set_ylim(-0.6, len(names) - 0.4)
    figure.suptitle(f"methods at matched budgets, sorted by retention, then {primary}; "
                    "* on the Pareto front (nothing scores higher at lower or equal retention)", fontsize=11)
    return _png(figure)


def _delta_interval(row: dict, flips: list[dict] | None) -> tuple[float, float]:
    """95% interval of a category's accuracy delta: the row's own when the audit gives one; else the
    paired normal interval from the answers that flip. Per sample the change d is nonzero only where
    the answer changed, so with b + c answers flipping correctness (either way) among n,
    var(d) <= (b + c) / n - delta^2 (equality for 0/1 correctness), the interval
    delta +- 1.96 sqrt(var / n), of zero width when nothing flips, as in a bootstrap over the
    samples. Without the flips: the unpaired interval, wider (conservative)."""
    if row.get("ci_low") is not None and row.get("ci_high") is not None:
        return row["ci_low"], row["ci_high"]
    n = max(row["n"], 1)
    if flips is not None:
        changed = sum(1 for flip in flips if flip["category"] == row["category"] and flip["kind"] != "changed")
        variance = max(changed / n - row["delta"] ** 2, 0.0)
    else:
        p, q = row["pruned_accuracy"], row["reference_accuracy"]
        variance = p * (1 - p) + q * (1 - q)
    half = 1.96 * (variance / n) ** 0.5
    return row["delta"] - half, row["delta"] + half


def plot_category_deltas(summary: dict) -> bytes | None:
    """Small multiples, one per pruned method: the accuracy delta per category with its 95% interval,
    rarest category on top; None without labelled categories."""
    methods = [(n, e["audit"]["category_deltas"]) for n, e in summary["methods"].items()
               if e.get("audit") and e["audit"]["category_deltas"]]
    if not methods:
        return None
    flips = {n: summary["methods"][n]["audit"].get("answer_flips") for n, _ in methods}
    categories = {}
    for _, rows in methods:
        for row in rows:
            categories.setdefault(row["category"], (row["n"], row["frequency"]))
    order = sorted(categories, key=lambda c: (categories[c][0], c))
    columns = min(len(methods), 4)
    grid_rows = -(-len(methods) // columns)
    figure = _figure(3.4 * columns + 1.6, 0.6 + grid_rows * (0.9 + 0.36 * len(order)))
    axes = figure.subplots(grid_rows, columns, sharex=True, sharey=True, squeeze=False,
                           gridspec_kw={"hspace": 0.35, "wspace": 0.06})
    ys = list(range(len(order)))[::-1]
    lows, highs = [0.0], [0.0]
    for index, axis in enumerate(axes.flat):
        if index >= len(methods):
            axis.set_visible(False)
            continue
        name, rows = methods[index]
        by_category = {row["category"]: row for row in rows}
        for category, y in zip(order, ys):
            row = by_category.get(category)
            if row is None:
                continue
            low, high = _delta_interval(row, flips[name])
            lows.append(low)
            highs.append(high)
            colour = "tab:red" if high < 0 else ("tab:blue" if low > 0 else "0.35")
            axis.errorbar([row["delta"]], [y], xerr=[[row["delta"] - low], [high - row["delta"]]], fmt="o",
                          color=colour, capsize=3, markersize=6)
        axis.axvline(0.0, color="k", lw=0.8)
        axis.grid(axis="x", alpha=0.3)
        axis.set_title(name, fontsize=11)
        if index % columns == 0:
            axis.set_yticks(ys)
            axis.set_yticklabels([f"{c}  n={categories[c][0]} ({100 * categories[c][1]:.0f}%)" for c in order],
                                 fontsize=9)
        if index >= len(methods) - columns:
            axis.set_xlabel("accuracy - unpruned", fontsize=9)
            axis.xaxis.set_tick_params(labelbottom=True)
    span = max(abs(min(lows)), abs(max(highs)), 0.05) * 1.08
    axes[0][0].set_xlim(-span, span)
    axes[0][0].set_ylim(-0.6, len(order) - 0.4)
    figure.suptitle("accuracy change per category against the unpruned model, paired 95% intervals, rarest "
                    "on top; red: below 0, blue: above", fontsize=11)
    return _png(figure)


def _dataset_section(dataset: dict) -> list[str]:
    """The counts the summary carries: rows read, rows skipped by reason, samples per category."""
    parts = ["<h2>Dataset</h2>"]
    counts = [["rows read", dataset.get("rows")], ["samples", dataset.get("samples")],
              ["closed questions", dataset.get("closed")], ["open questions", dataset.get("open")],
              ["rows skipped", dataset.get("skipped")]]
    parts.append(_table(["", "count"], [row for row in counts if row[1] is not None]))
    by_reason = dataset.get("skipped_by_reason")
    if by_reason is None and dataset.get("skipped_rows"):
        by_reason = {}
        for row in dataset["skipped_rows"]:
            by_reason[row["reason"]] = by_reason.get(row["reason"], 0) + 1
    if by_reason:
        parts.append("<h3>Rows skipped, by reason</h3>")
        parts.append(_table(["reason", "rows"], sorted(by_reason.items(), key=lambda item: (-item[1], item[0]))))
    if dataset.get("categories"):
        parts.append("<h3>Samples per category</h3>")
        parts.append(_table(["category", "samples"],
                            sorted(dataset["categories"].items(), key=lambda item: (item[1], item[0]))))
    return parts


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
    primary = _primary(summary)
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
    parts += _dataset_section(summary["dataset"])
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
