"""The eval's answer to "is it worth turning on": the headline metric against prefill cost.

``cost.png`` has two panels, one point per method with its bootstrap interval: the modelled prefill time
of a published configuration (:mod:`.cost`, default Qwen3-VL-8B at an H100 roofline) and the median
measured seconds of this run (tower + pruning + LLM prefill). Each method has its own colour and marker,
named in one legend beside the panels (no label is printed over the points); the Pareto front (no other
method scores higher or equal at lower or equal cost, one strictly) is the dashed line through its
methods. :func:`cost_table` gives the same numbers as rows for the report and the CLI.
"""

from __future__ import annotations

from pathlib import Path

from medpruner.eval.cost import PUBLISHED

__all__ = ["COST_PLOT", "cost_points", "cost_table", "dodge", "plot_cost"]

COST_PLOT = "cost.png"
DEFAULT_CONFIG = "qwen3-vl-8b"
_MARKERS = "os^Dv<>pPX*hH8d"


def _headline(entry: dict) -> tuple[float, float | None, float | None] | None:
    stats = entry["metrics"]["overall"].get(entry["primary_metric"])
    if not stats or not stats["n"]:
        return None
    return stats["mean"], stats["ci_low"], stats["ci_high"]


def cost_points(summary: dict, axis: str, config: str = DEFAULT_CONFIG) -> list[tuple[str, float, tuple]]:
    """(method, cost, (mean, ci_low, ci_high)) per method with both numbers: ``axis`` "modelled" (ms of
    ``config``) or "measured" (median seconds)."""
    points = []
    for name, entry in summary["methods"].items():
        cost = entry.get("cost") or {}
        if axis == "modelled":
            x = (cost.get("modelled") or {}).get(config, {}).get("ms")
        else:
            x = (cost.get("seconds_median") or {}).get("total")
        y = _headline(entry)
        if x is not None and y is not None:
            points.append((name, float(x), y))
    return points


def pareto_of(points) -> list[str]:
    from medpruner.eval.report import pareto_front

    return pareto_front([(name, x, y[0]) for name, x, y in points])


def cost_table(summary: dict) -> list[dict]:
    """One row per method: the headline metric, the slices encoded, the LLM visual tokens, the measured
    seconds per part, the modelled ms of every published configuration, and the Pareto membership."""
    on_modelled = set(pareto_of(cost_points(summary, "modelled")))
    on_measured = set(pareto_of(cost_points(summary, "measured")))
    rows = []
    for name, entry in summary["methods"].items():
        cost = entry.get("cost") or {}
        headline = _headline(entry)
        rows.append({
            "method": name,
            "metric": entry["primary_metric"],
            "mean": None if headline is None else headline[0],
            "slices_encoded": cost.get("slices_encoded"),
            "visual_tokens": cost.get("visual_tokens"),
            "seconds": cost.get("seconds_median") or {},
            "modelled_ms": {key: (cost.get("modelled") or {}).get(key, {}).get("ms") for key in PUBLISHED},
            "pareto_modelled": name in on_modelled,
            "pareto_measured": name in on_measured,
        })
    return rows


def dodge(points) -> dict:
    """x per point key, coincident points (within 1% of the x span and 0.5% of the y span) spread side by
    side by 1.5% of the x span so that none hides another (the front line keeps the true x)."""
    if not points:
        return {}
    xs = [x for _, x, _ in points]
    ys = [y[0] for _, _, y in points]
    span_x, span_y = (max(xs) - min(xs)) or max(abs(xs[0]), 1.0), (max(ys) - min(ys)) or 1.0
    groups: list[list[tuple[str, float]]] = []
    for name, x, y in points:
        for group in groups:
            gx, gy = group[0][1], next(p[2][0] for p in points if p[0] == group[0][0])
            if abs(x - gx) <= 0.01 * span_x and abs(y[0] - gy) <= 0.005 * span_y:
                group.append((name, x))
                break
        else:
            groups.append([(name, x)])
    shifted = {}
    for group in groups:
        for i, (name, x) in enumerate(group):
            shifted[name] = x + (i - (len(group) - 1) / 2) * 0.015 * span_x
    return shifted


def plot_cost(summary: dict, out_dir, config: str = DEFAULT_CONFIG) -> Path | None:
    """Write ``cost.png`` (see the module docstring); None when no method has both numbers."""
    from medpruner.report import _figure, _png, atomic_write_bytes

    panels = [("modelled", f"modelled prefill, {PUBLISHED[config].name} (ms, H100 roofline)"),
              ("measured", "measured prefill on this machine (median s)")]
    data = [(axis, label, cost_points(summary, axis, config)) for axis, label in panels]
    if not any(points for _, _, points in data):
        return None
    names = list(summary["methods"])
    from matplotlib import colormaps

    palette = colormaps["tab20"]
    style = {name: (palette(i % 20), _MARKERS[i % len(_MARKERS)]) for i, name in enumerate(names)}
    primary = next(iter(summary["methods"].values()))["primary_metric"]
    figure = _figure(12.5, 4.8)
    axes = figure.subplots(1, 2)
    handles = {}
    for axis_obj, (_, label, points) in zip(axes, data, strict=True):
        shifted = dodge(points)
        for name, x, (mean, low, high) in points:
            colour, marker = style[name]
            x = shifted[name]
            error = None if low is None else [[mean - low], [high - mean]]
            handle = axis_obj.errorbar([x], [mean], yerr=error, fmt=marker, color=colour, markersize=8, capsize=3,
                                       markeredgecolor="black", markeredgewidth=0.5, label=name)
            handles.setdefault(name, handle)
        front = pareto_of(points)
        if len(front) > 1:
            where = {name: (x, y[0]) for name, x, y in points}
            xs, ys = zip(*(where[name] for name in front), strict=True)
            axis_obj.plot(xs, ys, linestyle="--", color="0.4", linewidth=1, zorder=0)
        axis_obj.set_xlabel(label, fontsize=11)
        axis_obj.set_ylabel(primary, fontsize=11)
        axis_obj.grid(alpha=0.3)
        axis_obj.tick_params(labelsize=10)
    ordered = [handles[name] for name in names if name in handles]
    figure.legend(ordered, [h.get_label() for h in ordered], loc="center left", bbox_to_anchor=(0.86, 0.5),
                  fontsize=10, frameon=False, title="method (dashed: Pareto front)", title_fontsize=10)
    figure.subplots_adjust(left=0.06, right=0.85, wspace=0.22, bottom=0.13, top=0.95)
    path = Path(out_dir) / COST_PLOT
    atomic_write_bytes(path, _png(figure))
    return path
