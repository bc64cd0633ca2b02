"""Reports of a pruning run: ``report.json``, PNG figures and a self-contained ``report.html``.

Figures are drawn on ``matplotlib.figure.Figure`` objects with the Agg canvas (no pyplot, no GUI
backend, no global state, so they are safe from worker threads). Every file is written to a temporary
name in the target folder and renamed into place, so a crash never leaves half a report.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import platform
import sys
import tempfile
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

import numpy as np

__all__ = [
    "atomic_write_bytes",
    "atomic_write_text",
    "environment",
    "plot_distances",
    "plot_montage",
    "plot_token_heatmaps",
    "render_html",
    "write_report",
]

REPORT_VERSION = 1
KEPT_COLOUR = "#1a9850"
DROPPED_COLOUR = "#d73027"
MARK_COLOUR = "#ffd700"


# ---------------------------------------------------------------------------------------- writing
def atomic_write_bytes(path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        # mkstemp creates the file private (0600); a report is an ordinary file.
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def to_json(obj, *, indent: int | None = 2) -> str:
    return json.dumps(obj, indent=indent, default=_json_default, allow_nan=False)


# ------------------------------------------------------------------------------------ environment
def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def environment(device: str | None = None, backend: str | None = None) -> dict:
    """Versions and hardware a result was produced with."""
    info = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "device": device,
        "backend": backend,
        "packages": {
            name: _version(name)
            for name in (
                "medpruner-kernels",
                "torch",
                "triton",
                "numpy",
                "nibabel",
                "pydicom",
                # The decoders of compressed DICOM: which one read a file's pixels depends on these.
                "pylibjpeg",
                "pylibjpeg-libjpeg",
                "pylibjpeg-openjpeg",
                "pynrrd",
                "matplotlib",
                "transformers",
            )
        },
    }
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        info["torch_cuda"] = torch.version.cuda
        if device is not None and device.startswith("cuda") and torch.cuda.is_available():
            info["device_name"] = torch.cuda.get_device_name(torch.device(device))
    if "medpruner_kernels" in sys.modules:
        kernels = sys.modules["medpruner_kernels"]
        info["cpp_extension"] = bool(getattr(kernels, "CPP_AVAILABLE", False))
        info["triton_available"] = bool(getattr(kernels, "TRITON_AVAILABLE", False))
    return info


# ---------------------------------------------------------------------------------------- figures
def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", bbox_inches="tight")
    return buffer.getvalue()


def _oriented(image: np.ndarray, flips: tuple[bool, bool]) -> np.ndarray:
    if flips[0]:
        image = image[::-1]
    if flips[1]:
        image = image[:, ::-1]
    return image


def _spread(indices: np.ndarray, count: int) -> np.ndarray:
    if indices.size <= count:
        return indices
    return indices[np.unique(np.linspace(0, indices.size - 1, count).round().astype(int))]


def montage_indices(keep: np.ndarray, max_tiles: int) -> np.ndarray:
    """At most ``max_tiles`` slices, half kept and half dropped where both exist, each evenly spread."""
    kept = np.flatnonzero(keep)
    dropped = np.flatnonzero(~keep)
    share = max_tiles // 2
    take_kept = min(kept.size, max(share, max_tiles - dropped.size))
    take_dropped = min(dropped.size, max_tiles - take_kept)
    return np.sort(np.concatenate([_spread(kept, take_kept), _spread(dropped, take_dropped)]))


def montage_summary(keep: np.ndarray, shown: int, gamma: float, marked: dict[int, str] | None = None) -> str:
    """The montage's caption: slices kept, whether the tiles are a sample, and what the stars mark."""
    summary = f"{int(keep.sum())}/{keep.size} slices kept at gamma={gamma:g}"
    if shown < keep.size:
        summary += f"; {shown} of the {keep.size} slices shown (an even sample of the kept and the dropped)"
    if marked:
        summary += f"; star: {', '.join(sorted(set(marked.values())))}"
    return summary


def plot_montage(
    slices: np.ndarray,
    keep: np.ndarray,
    distances: np.ndarray,
    gamma: float,
    *,
    flips: tuple[bool, bool] = (False, False),
    max_tiles: int = 40,
    columns: int = 8,
    title: str = "",
    marked: dict[int, str] | None = None,
) -> bytes:
    """PNG of kept (green frame) and dropped (red frame) slices, each labelled with its index and its
    mean |difference| to the anchor it was compared with (on the [-1, 1] scale, like gamma). A volume of
    more than ``max_tiles`` slices shows an even sample of them, and the title says so.

    ``slices``: ``[D, H, W]`` in [0, 1]; ``keep``: bool ``[D]``; ``distances``: ``[D]``; ``marked``:
    slice -> a short label shown in the tile's title and by a marker in its corner (the demo's lesions).
    """
    keep = np.asarray(keep, dtype=bool)
    marked = marked or {}
    chosen = montage_indices(keep, max_tiles)
    columns = max(1, min(columns, chosen.size))
    rows = math.ceil(chosen.size / columns)
    height, width = slices.shape[1:]
    tile = 2.2
    aspect = height / max(width, 1)
    figure = _figure(columns * tile, rows * (tile * aspect + 0.5) + 0.9)
    for position, index in enumerate(chosen):
        axes = figure.add_subplot(rows, columns, position + 1)
        axes.imshow(_oriented(np.asarray(slices[index]), flips), cmap="gray", vmin=0.0, vmax=1.0)
        colour = KEPT_COLOUR if keep[index] else DROPPED_COLOUR
        state = "kept" if keep[index] else "dropped"
        label = "anchor" if index == 0 else f"d={float(distances[index]):.3f}"
        if int(index) in marked:
            label += f" | {marked[int(index)]}"
            axes.plot([0.9], [0.1], marker="*", markersize=13, color=MARK_COLOUR, markeredgecolor="black",
                      transform=axes.transAxes)
        axes.set_title(f"#{index} {state}\n{label}", fontsize=10, color=colour)
        axes.set_xticks([])
        axes.set_yticks([])
        for spine in axes.spines.values():
            spine.set_edgecolor(colour)
            spine.set_linewidth(2.5)
    summary = montage_summary(keep, chosen.size, gamma, marked)
    figure.suptitle(f"{title}\n{summary}" if title else summary, fontsize=12)
    return _png(figure)


def plot_distances(
    distances: np.ndarray,
    keep: np.ndarray,
    gamma: float,
    *,
    title: str = "",
) -> bytes:
    """PNG of each slice's distance to its anchor along the volume, with gamma and the kept slices."""
    distances = np.asarray(distances, dtype=np.float64)
    keep = np.asarray(keep, dtype=bool)
    index = np.arange(distances.size)
    figure = _figure(9.5, 3.4)
    axes = figure.add_subplot(1, 1, 1)
    axes.plot(index, distances, color="#4575b4", linewidth=1.0, label="distance to anchor")
    axes.scatter(index[keep], distances[keep], s=14, color=KEPT_COLOUR, zorder=3, label="kept (new anchor)")
    axes.scatter(index[~keep], distances[~keep], s=6, color=DROPPED_COLOUR, zorder=3, label="dropped")
    axes.axhline(gamma, color="black", linestyle="--", linewidth=1.0, label=f"gamma = {gamma:g}")
    axes.set_xlabel("slice index")
    axes.set_ylabel("mean |x[s] - x[anchor]| ([-1, 1] scale)")
    axes.set_xlim(-0.5, max(distances.size - 0.5, 0.5))
    axes.set_ylim(bottom=0.0)
    from matplotlib.ticker import MaxNLocator

    axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # slices are whole numbers
    axes.grid(alpha=0.3)
    # outside the axes: a legend inside would hide the points under it
    axes.legend(fontsize=9, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    summary = f"{int(keep.sum())}/{keep.size} kept ({100.0 * keep.mean():.1f}%)" if keep.size else "no slices"
    axes.set_title(f"{title}: {summary}" if title else summary, fontsize=11)
    return _png(figure)


def _token_grid(name: str, values, grid: tuple[int, int] | None) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim == 1:
        if grid is None:
            side = math.isqrt(array.size)
            if side * side != array.size:
                raise ValueError(f"{name}: {array.size} tokens are not a square grid; pass grid=(rows, cols)")
            grid = (side, side)
        if grid[0] * grid[1] != array.size:
            raise ValueError(f"{name}: {array.size} tokens do not fill grid {grid}")
        array = array.reshape(grid)
    if array.ndim != 2:
        raise ValueError(f"{name}: expected [rows, cols] or [tokens] per slice, got shape {array.shape}")
    return array


def plot_token_heatmaps(
    slices: np.ndarray,
    slice_indices: Sequence[int],
    importance: Sequence,
    keep_tokens: Sequence | None = None,
    *,
    grid: tuple[int, int] | None = None,
    flips: tuple[bool, bool] = (False, False),
    columns: int = 4,
    title: str = "",
    marked: dict[int, str] | None = None,
) -> bytes:
    """PNG of per-slice token importance over the slice, with pruned tokens shaded, in the order of
    ``slice_indices`` (the caller puts the slices of interest first), on one colour scale for every
    panel (one labelled colour bar), so that panels compare.

    Args:
        slices: ``[D, H, W]`` in [0, 1].
        slice_indices: which slices the token arrays belong to (the kept slices, usually).
        importance: one array per slice, ``[rows, cols]`` token grid or ``[tokens]`` (reshaped to
            ``grid``, or to a square); the token grid is stretched over the whole slice.
        keep_tokens: optional bool arrays of the same shapes: tokens the nucleus kept.
        marked: slice -> a short label added to the panel's title (the demo's lesions).
    """
    if len(importance) != len(slice_indices):
        raise ValueError(f"importance has {len(importance)} arrays for {len(slice_indices)} slice_indices")
    if keep_tokens is not None and len(keep_tokens) != len(slice_indices):
        raise ValueError(f"keep_tokens has {len(keep_tokens)} arrays for {len(slice_indices)} slice_indices")
    from matplotlib.colors import Normalize

    count = len(slice_indices)
    if count == 0:
        raise ValueError("plot_token_heatmaps: no slices given")
    columns = max(1, min(columns, count))
    rows = math.ceil(count / columns)
    height, width = slices.shape[1:]
    marked = marked or {}
    grids = [_token_grid("importance", values, grid).astype(np.float64) for values in importance]
    low = min(float(g.min()) for g in grids)
    high = max(float(g.max()) for g in grids)
    norm = Normalize(vmin=low, vmax=high if high > low else low + 1.0)
    figure = _figure(columns * 3.0 + 1.0, rows * (3.0 * height / max(width, 1) + 0.4) + 0.6)
    panels = []
    for position, index in enumerate(slice_indices):
        scores = grids[position]
        axes = figure.add_subplot(rows, columns, position + 1)
        extent = (-0.5, width - 0.5, height - 0.5, -0.5)
        axes.imshow(
            _oriented(np.asarray(slices[index]), flips), cmap="gray", vmin=0.0, vmax=1.0, extent=extent
        )
        heat = axes.imshow(
            _oriented(scores, flips),
            cmap="inferno",
            alpha=0.45,
            extent=extent,
            interpolation="nearest",
            norm=norm,
        )
        panels.append(axes)
        label = f"#{index}" + (f" ({marked[int(index)]})" if int(index) in marked else "")
        if keep_tokens is not None:
            kept = _token_grid("keep_tokens", keep_tokens[position], scores.shape).astype(bool)
            if kept.shape != scores.shape:
                raise ValueError(f"keep_tokens[{position}] has shape {kept.shape}, importance {scores.shape}")
            shade = np.zeros((*kept.shape, 4))
            shade[~kept, 3] = 0.6
            axes.imshow(_oriented(shade, flips), extent=extent, interpolation="nearest")
            label += f": {int(kept.sum())}/{kept.size} tokens kept"
        axes.set_title(label, fontsize=10)
        axes.set_xticks([])
        axes.set_yticks([])
    # Scores often differ only in the third decimal: enough digits to tell them apart.
    bar = figure.colorbar(heat, ax=panels, fraction=0.03, pad=0.02, format="{x:.4g}")
    bar.set_label("attention received (DINS importance), one scale for every panel", fontsize=10)
    heading = "token importance (pruned tokens shaded)"
    figure.suptitle(f"{title}: {heading}" if title else heading, fontsize=11)
    return _png(figure)


# ---------------------------------------------------------------------------------------- report
def _base64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _assumed(volume: dict, name: str, value) -> str:
    """``value`` as text, marked when the loader assumed it (``volume["assumed"]``)."""
    if isinstance(value, (list, tuple)):
        text = " x ".join(f"{v:g}" for v in value)
    else:
        text = str(value)
    return f"{text} (assumed: not recorded in the file)" if name in volume.get("assumed", ()) else text


def _number(value) -> str:
    return f"{value:g}" if isinstance(value, (int, float)) else "?"


def window_html_text(window) -> str:
    """A window's description (``Window.describe()``) as text, not Python dict syntax."""
    if not isinstance(window, dict):
        return str(window)
    kind = window.get("kind")
    if kind == "ct":
        level, width = _number(window.get("level")), _number(window.get("width"))
        return f"CT {window.get('name')}: level {level} HU, width {width} HU"
    if kind == "percentile":
        low, high = _number(window.get("low_percentile")), _number(window.get("high_percentile"))
        return f"percentile scaling {low}% .. {high}% to [0, 1]"
    if kind == "unit":
        return "none: intensities already in [0, 1] (clipped to it)"
    return ", ".join(f"{k} {v}" for k, v in window.items())


def _timings_table(timings: dict) -> str:
    cells = "".join(
        f"<tr><td>{html.escape(str(name))}</td><td class='num'>{1000.0 * float(seconds):.1f} ms</td></tr>"
        for name, seconds in timings.items()
    )
    return f"<table class='inner'>{cells}</table>"


def _nonfinite_html(nonfinite: dict) -> str:
    counts = ", ".join(
        f"{nonfinite.get(key, 0)} {label}" for key, label in (("nan", "NaN"), ("posinf", "+Inf"), ("neginf", "-Inf"))
        if nonfinite.get(key)
    )
    return (f"{counts} of {nonfinite.get('voxels')} voxels replaced before windowing: {nonfinite.get('policy')} "
            f"(finite range {nonfinite.get('finite_min'):g} .. {nonfinite.get('finite_max'):g})")


def _share(value) -> str:
    return "-" if value is None else f"{100.0 * float(value):.0f}%"


def _lesion_rows(focus: dict) -> list[tuple[str, str]]:
    """The demo's lesion statistics (``lesion_focus`` of its report.json) as table rows."""
    lesions = focus.get("lesions") or []
    kept = focus.get("lesion_slices_kept_by_iaf", [])
    classes = ", ".join(f"{lesion.get('cls')} at slice {lesion.get('z')}" for lesion in lesions)
    return [
        ("lesions", f"{len(lesions)}: {classes}" if lesions else "none"),
        ("lesion slices kept by IAF", f"{len(kept)}/{len(focus.get('lesion_slices', []))} {kept}"),
        ("attention on lesion tokens", f"{_share(focus.get('importance_share'))} of the importance on "
                                       f"{_share(focus.get('area_share'))} of the tokens (heatmap slices "
                                       f"{focus.get('heatmap_lesion_slices')})"),
        ("tokens kept", f"lesion {_share(focus.get('lesion_tokens_kept'))}, background "
                        f"{_share(focus.get('background_tokens_kept'))}"),
    ]


def render_html(report: dict, images: dict[str, bytes]) -> str:
    """A single HTML page with the summary table and the figures embedded as base64 PNGs."""
    result = report.get("result", {})
    volume = report.get("volume", {})
    rows = [
        ("source", volume.get("source")),
        ("shape [D, H, W]", " x ".join(str(n) for n in volume.get("shape", ()))),
        ("spacing (mm)", _assumed(volume, "spacing", volume.get("spacing_mm", ()))),
        ("orientation", _assumed(volume, "orientation", volume.get("orientation"))),
        ("modality", _assumed(volume, "modality", volume.get("modality"))),
        ("slice axis", f"{volume.get('slice_axis')} ({volume.get('slice_axis_reason')})"),
    ]
    if volume.get("nonfinite"):
        rows.append(("non-finite voxels", _nonfinite_html(volume["nonfinite"])))
    if volume.get("constant"):
        rows.append(("warning", "constant volume (every voxel has one value): IAF keeps only the first slice"))
    rows += [
        ("window", window_html_text(report.get("config", {}).get("window"))),
        ("gamma ([-1, 1] scale)", report.get("config", {}).get("gamma")),
        ("slices kept", f"{result.get('kept')}/{result.get('num_slices')}"),
        ("retention", result.get("retention")),
    ]
    tokens = report.get("tokens")
    if tokens is not None:
        rows += [
            ("model", f"{tokens.get('model')} ({tokens.get('family')})"),
            ("DINS", f"tau {tokens.get('tau')}, mode {tokens.get('mode')}, merge {tokens.get('merge')}"),
            ("visual tokens kept", f"{tokens.get('tokens_after')}/{tokens.get('tokens_before')}"),
            ("token retention", tokens.get("token_retention")),
            ("tokens per slice", tokens.get("tokens_per_slice")),
            ("prompt", tokens.get("prompt")),
            ("answer", tokens.get("generated_text")),
        ]
    focus = report.get("lesion_focus")
    if focus:
        rows += _lesion_rows(focus)
    rows += [
        ("backend", report.get("environment", {}).get("backend")),
        ("device", report.get("environment", {}).get("device")),
    ]
    table = "\n".join(
        f"<tr><th>{html.escape(str(name))}</th><td>{html.escape(str(value))}</td></tr>"
        for name, value in rows
    )
    # Already HTML (escaped cell by cell): the timings as a table of their own.
    table += f"\n<tr><th>timings</th><td>{_timings_table(report.get('timings_s', {}))}</td></tr>"
    figures = "\n".join(
        f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,{_base64(data)}">'
        f"<figcaption>{html.escape(name)}</figcaption></figure>"
        for name, data in images.items()
    )
    return (
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>MedPruner report</title>"
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "th,td{border:1px solid #ccc;padding:4px 8px;text-align:left}img{max-width:100%}"
        "table.inner td{border:none;padding:0 8px 0 0}td.num{text-align:right}</style>"
        f"</head><body><h1>MedPruner report</h1><table>{table}</table>{figures}</body></html>\n"
    )


def write_report(
    out_dir,
    report: dict,
    slices: np.ndarray,
    *,
    flips: tuple[bool, bool] = (False, False),
    token_importance: Sequence | None = None,
    token_keep: Sequence | None = None,
    token_slices: Sequence[int] | None = None,
    token_grid: tuple[int, int] | None = None,
    html_page: bool = True,
    marked: dict[int, str] | None = None,
) -> dict[str, Path]:
    """Write ``report.json``, ``montage.png``, ``distances.png`` (``tokens.png`` when per-slice token
    arrays are given) and ``report.html`` into ``out_dir``; return their paths by name.

    ``report`` must hold ``config.gamma`` and ``result.keep`` / ``result.distance_to_anchor``;
    ``slices``: the ``[D, H, W]`` [0, 1] slices IAF ran on (after windowing); ``marked``: slice -> label
    marked in the montage and the heatmaps (the demo's lesion slices).
    """
    out = Path(out_dir)
    gamma = float(report["config"]["gamma"])
    keep = np.asarray(report["result"]["keep"], dtype=bool)
    distances = np.asarray(report["result"]["distance_to_anchor"], dtype=np.float64)
    title = Path(str(report.get("volume", {}).get("source") or "volume")).name
    images = {
        "montage.png": plot_montage(slices, keep, distances, gamma, flips=flips, title=title, marked=marked),
        "distances.png": plot_distances(distances, keep, gamma, title=title),
    }
    if token_importance is not None:
        indices = list(token_slices) if token_slices is not None else list(np.flatnonzero(keep))
        images["tokens.png"] = plot_token_heatmaps(
            slices, indices, token_importance, token_keep, grid=token_grid, flips=flips, title=title, marked=marked
        )
    written = {name: atomic_write_bytes(out / name, data) for name, data in images.items()}
    report = dict(report, files=sorted([*images, "report.json", *(["report.html"] if html_page else [])]))
    if html_page:
        written["report.html"] = atomic_write_text(out / "report.html", render_html(report, images))
    # report.json last: its presence means the whole report is there.
    written["report.json"] = atomic_write_text(out / "report.json", to_json(report) + "\n")
    return written
