"""One volume through IAF (and, with a model, the whole pipeline): the record that report.json and the
batch's results lines share, the printed summary, and the report folder."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medpruner.cli.common import pick_device, synchronize
from medpruner.cli.models import TokenOptions, TokenResult, model_inputs, model_slices, run_model
from medpruner.report import environment, write_report
from medpruner.volume import Volume, VolumeError, Window, load_volume, normalize


@dataclass
class PruneResult:
    volume: Volume
    slices: np.ndarray
    window: Window
    keep: np.ndarray
    distances: np.ndarray
    timings: dict[str, float]
    backend: str
    device: str


def window_volume(volume: Volume, window) -> tuple[np.ndarray, Window, float]:
    start = time.perf_counter()
    slices, chosen = normalize(volume, window)
    return slices, chosen, time.perf_counter() - start


def run_iaf(
    volume: Volume,
    slices: np.ndarray,
    chosen: Window,
    gamma: float,
    *,
    backend: str = "auto",
    device: str = "auto",
    timings: dict[str, float] | None = None,
    pixels=None,
) -> PruneResult:
    """IAF on [0, 1] slices mapped to [-1, 1], so ``gamma`` is on the models' scale; or, given
    ``pixels`` (a model's normalised pixel tensor, its rows grouped by slice), on exactly what the
    model's own IAF compares."""
    import torch

    import medpruner_kernels
    from medpruner_kernels._dispatch import resolve_backend

    target = pick_device(device)
    used = resolve_backend("iaf_select", target, backend, cpp_ops=("iaf_select",))
    timings = dict(timings or {})
    start = time.perf_counter()
    if pixels is not None:
        signed = pixels.to(target, torch.float32).reshape(slices.shape[0], -1)
    else:
        # Out of place: on CPU ``to`` returns the tensor that shares memory with ``slices``.
        signed = torch.from_numpy(np.ascontiguousarray(slices)).to(target) * 2.0 - 1.0
    synchronize(target)
    timings["to_device"] = time.perf_counter() - start

    start = time.perf_counter()
    try:
        # The distances for the report come from the same pass that decides the slices.
        keep, distances = medpruner_kernels.iaf_select(signed, gamma, backend=backend, return_distances=True)
    except ValueError as err:
        # Bad values found at once (CPU); on CUDA the same check is deferred to raise_deferred_errors.
        raise VolumeError(volume.source, str(err)) from err
    synchronize(target)
    timings["iaf"] = time.perf_counter() - start
    keep = keep.cpu().numpy().astype(bool)
    distances = distances.cpu().numpy().astype(np.float32)
    raise_deferred_errors(volume.source)
    return PruneResult(
        volume=volume,
        slices=slices,
        window=chosen,
        keep=keep,
        distances=distances,
        timings=timings,
        backend=used,
        device=str(target),
    )


def raise_deferred_errors(source) -> None:
    """Raise the value checks that the kernels deferred while a volume ran (on CUDA, or on CPU under
    ``medpruner_kernels._validation.deferred_checks``) as a :class:`VolumeError` naming the volume.

    Called after the volume's last host read, when the queued flags are ready and reading them adds no
    wait; the queue is empty afterwards, so the next volume starts clean."""
    import medpruner_kernels

    try:
        medpruner_kernels.raise_pending_errors()
    except ValueError as err:
        raise VolumeError(source, str(err)) from err


def result_record(result: PruneResult, gamma: float, extra_config: dict | None = None) -> dict:
    """The JSON content of a run (report.json and one results.jsonl line share it)."""
    keep = result.keep
    kept = int(keep.sum())
    total = int(keep.size)
    return {
        "medpruner_report": 1,
        "config": {
            "gamma": gamma,
            "gamma_scale": "mean |difference| on the [-1, 1] scale (mean = std = 0.5)",
            "window": result.window.describe(),
            **(extra_config or {}),
        },
        "volume": result.volume.describe(),
        "result": {
            "num_slices": total,
            "kept": kept,
            "dropped": total - kept,
            "retention": kept / total if total else 0.0,
            "kept_indices": np.flatnonzero(keep).tolist(),
            "keep": keep.tolist(),
            "distance_to_anchor": [round(float(d), 6) for d in result.distances],
        },
        "timings_s": {name: round(seconds, 6) for name, seconds in result.timings.items()},
        "environment": environment(device=result.device, backend=result.backend),
    }


def window_text(window: dict) -> str:
    """A window's JSON description (:meth:`Window.describe`) as one line for people."""
    if window["kind"] == "ct":
        return f"{window['name']} (level {window['level']:g}, width {window['width']:g} HU)"
    if window["kind"] == "unit":
        return "none: intensities already in [0, 1] (clipped to it)"
    return f"percentiles {window['low_percentile']:g}..{window['high_percentile']:g}"


def _marked(volume: dict, name: str, text: str) -> str:
    return f"{text} (assumed)" if name in volume.get("assumed", ()) else text


def geometry_text(volume: dict) -> str:
    """Modality, shape, spacing and orientation of a record's volume, each guess marked "(assumed)"."""
    return (
        f"{_marked(volume, 'modality', volume['modality'])} {'x'.join(map(str, volume['shape']))} "
        f"(D x H x W), spacing "
        f"{_marked(volume, 'spacing', 'x'.join(f'{s:g}' for s in volume['spacing_mm']) + ' mm')}, "
        f"orientation {_marked(volume, 'orientation', volume['orientation'])}"
    )


def nonfinite_text(nonfinite: dict) -> str:
    """The NaN/Inf voxels replaced in a volume and the policy, as one line."""
    counts = ", ".join(
        f"{nonfinite[key]} {label}" for key, label in (("nan", "NaN"), ("posinf", "+Inf"), ("neginf", "-Inf"))
        if nonfinite[key]
    )
    return (
        f"{counts} of {nonfinite['voxels']} voxels replaced before windowing: {nonfinite['policy']} "
        f"({nonfinite['finite_min']:g}..{nonfinite['finite_max']:g})"
    )


def value_warnings(volume: dict) -> list[str]:
    """The summary lines about a volume's values: replaced NaN/Inf voxels, a constant volume."""
    lines = []
    if volume.get("nonfinite"):
        lines.append(f"warning    {nonfinite_text(volume['nonfinite'])}")
    if volume.get("constant"):
        lines.append("warning    constant volume (every voxel has one value): IAF keeps only the first slice")
    return lines


def summary_text(record: dict) -> str:
    result, volume, config = record["result"], record["volume"], record["config"]
    timings = ", ".join(f"{name} {seconds * 1000:.1f} ms" for name, seconds in record["timings_s"].items())
    lines = [
        f"volume     {volume['source']}",
        f"           {geometry_text(volume)}",
        f"           slice axis {volume['slice_axis']}: {volume['slice_axis_reason']}",
        *value_warnings(volume),
        f"window     {window_text(config['window'])}",
        f"IAF        gamma {config['gamma']:g} on [-1, 1]: "
        f"kept {result['kept']}/{result['num_slices']} slices (retention {100.0 * result['retention']:.1f}%)",
        f"backend    {record['environment']['backend']} on {record['environment']['device']}",
    ]
    tokens = record.get("tokens")
    if tokens is not None:
        lines += [
            f"model      {tokens['model']} ({tokens['family']}), slices resized to "
            f"{'x'.join(map(str, tokens['slice_size']))}",
            f"DINS       tau {tokens['tau']:g}, mode {tokens['mode']}, merge {'on' if tokens['merge'] else 'off'}: "
            f"visual tokens {tokens['tokens_after']}/{tokens['tokens_before']} "
            f"(retention {100.0 * tokens['token_retention']:.1f}%), {tokens['slices_encoded']} slices encoded",
            f"generated  {tokens['generated_tokens']} tokens: {tokens['generated_text']!r}",
        ]
    lines.append(f"time       {timings}")
    return "\n".join(lines)


def prune_loaded(
    volume: Volume,
    slices: np.ndarray,
    chosen: Window,
    timings: dict[str, float],
    *,
    gamma: float,
    backend: str,
    device: str,
    tokens: TokenOptions | None = None,
    extra_config: dict | None = None,
) -> tuple[dict, PruneResult, TokenResult | None]:
    """IAF (and, with ``tokens``, the model pipeline) on windowed slices -> (record, result, tokens).

    With a model the slices are first resized to its resolution, so the report's IAF and the model's
    run on the same pixels."""
    inputs = None
    if tokens is not None:
        start = time.perf_counter()
        slices = model_slices(slices, tokens.resolution, tokens.bundle.size_multiple)
        inputs = model_inputs(tokens.bundle, slices, tokens.prompt)
        timings = dict(timings, model_inputs=time.perf_counter() - start)
    pixels = None if inputs is None else inputs[tokens.bundle.pixel_key]
    token_result = None
    try:
        result = run_iaf(
            volume, slices, chosen, gamma, backend=backend, device=device, timings=timings, pixels=pixels
        )
        if tokens is not None:
            token_result = run_model(
                tokens.bundle,
                inputs,
                result.keep,
                gamma=gamma,
                tau=tokens.tau,
                mode=tokens.mode,
                merge=tokens.merge,
                backend=backend,
                prompt=tokens.prompt,
                max_new_tokens=tokens.max_new_tokens,
                heatmap_slices=tokens.heatmap_slices,
            )
    except Exception:
        # A failure while a kernel's check is still queued most likely comes from that bad input (the
        # model ran on it): report the check, with the failure chained.
        raise_deferred_errors(volume.source)
        raise
    # The model's reads came last (its adapter raises its own deferred checks there); anything queued
    # since is raised before this volume's record is written.
    raise_deferred_errors(volume.source)
    if token_result is not None:
        result.timings.update(token_result.timings)
    record = result_record(result, gamma, extra_config)
    if token_result is not None:
        record["tokens"] = dict(token_result.record, slice_size=list(slices.shape[1:]))
        record["config"]["gamma_scale"] = (
            "mean |difference| on the model's normalised pixel tensor (what its own IAF compares; "
            "[-1, 1] for processors with mean = std = 0.5)"
        )
        record["result"]["tokens_per_slice"] = token_result.record["tokens_per_slice"]
        record["result"]["token_retention"] = token_result.record["token_retention"]
    return record, result, token_result


def prune_one(source, **options) -> dict:
    """:func:`prune_and_report`'s record."""
    return prune_and_report(source, **options)[0]


def prune_and_report(
    source,
    *,
    gamma: float,
    window,
    slice_axis: int | None,
    frame: int | None,
    backend: str,
    device: str,
    out_dir: Path | None,
    tokens: TokenOptions | None = None,
    extra_config: dict | None = None,
    html_page: bool = True,
    key: str | None = None,
    modality: str | None = None,
    marked: dict[int, str] | None = None,
) -> tuple[dict, TokenResult | None]:
    """One volume: load, window, IAF (and the model with ``tokens``), the report in ``out_dir``.
    Returns the record and the model run's :class:`TokenResult` (its heatmap arrays; None without
    ``tokens``). ``key``: the array of an ``.npz``; ``modality``: what the volume is (not guessed);
    ``marked``: slice -> label marked in the report's pictures (the demo's lesions)."""
    start = time.perf_counter()
    volume = load_volume(source, slice_axis=slice_axis, frame=frame, key=key, modality=modality)
    load_seconds = time.perf_counter() - start
    slices, chosen, window_seconds = window_volume(volume, window)
    record, result, token_result = prune_loaded(
        volume,
        slices,
        chosen,
        {"load": load_seconds, "window": window_seconds},
        gamma=gamma,
        backend=backend,
        device=device,
        tokens=tokens,
        extra_config=extra_config,
    )
    if out_dir is not None:
        start = time.perf_counter()
        heatmaps = {}
        if token_result is not None and token_result.heatmap_slices:
            heatmaps = dict(
                token_importance=token_result.importance,
                token_keep=token_result.keep,
                token_slices=token_result.heatmap_slices,
                token_grid=token_result.grid,
            )
        # The report's own timing is known only after its figures exist; report.json carries the rest.
        write_report(
            out_dir, record, result.slices, flips=volume.display_flips(), html_page=html_page, marked=marked,
            **heatmaps,
        )
        record["timings_s"]["report"] = round(time.perf_counter() - start, 6)
        record["report_dir"] = str(out_dir)
    return record, token_result


def report_files(out_dir: Path) -> str:
    names = sorted(p.name for p in out_dir.iterdir() if not p.name.startswith("."))
    return f"{out_dir}: {', '.join(names)}"
