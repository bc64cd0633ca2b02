"""The ``medpruner`` command.

    medpruner prune VOLUME [--gamma 0.05] [--window auto] [--out DIR] [--json]     one volume (+ report)
    medpruner prune VOLUME --model CKPT [--tau 0.9] [--mode fast|paper]           + token pruning (DINS)
    medpruner prune DIR_OR_GLOB ... --out DIR                                       many: results.jsonl
    medpruner demo [--out DIR] [--model CKPT]                 MNI152 brain MRI through a (tiny) Qwen3-VL
    medpruner bench [--json] [PYTEST_ARGS ...]                 the bench/ microbenchmarks, as a table

Without a model, ``prune`` runs slice-level IAF: the volume is windowed to [0, 1] (CT presets or MRI
percentiles), mapped to the models' [-1, 1] scale, and compared with ``gamma`` on that scale
(DESIGN.md). With ``--model`` (a local checkpoint; the demo builds a tiny random-weight Qwen3-VL when
none is given) the slices are resized to the model's resolution and the whole pipeline runs inside its
``generate``; the report's IAF then runs on the model's own pixel tensor, so its slice decisions are
the model's.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medpruner._tiny import image_only_processor as _image_only_processor
from medpruner.report import atomic_write_text, environment, to_json, write_report
from medpruner.volume import (
    CT_WINDOWS,
    NIBABEL_SUFFIXES,
    NRRD_SUFFIXES,
    NUMPY_SUFFIXES,
    SUPPORTED_SUFFIXES,
    Volume,
    VolumeError,
    Window,
    load_volume,
    normalize,
    resolve_window,
)

RESULTS_NAME = "results.jsonl"
DEFAULT_GAMMA = 0.05
DEFAULT_TAU = 0.9
MNI_TEMPLATE = ("nilearn", "datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")
NIBABEL_SAMPLE = ("nibabel", "tests/data/anatomical.nii")
# Files that are whole volumes on their own; any other file in a folder makes it a DICOM series folder.
_VOLUME_FILE_SUFFIXES = NIBABEL_SUFFIXES + NRRD_SUFFIXES + NUMPY_SUFFIXES


class CommandError(Exception):
    """A usage problem reported as ``error: ...`` with exit status 2."""


# --------------------------------------------------------------------------------------------- IAF
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


def _pick_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CommandError("--device cuda: no CUDA device is available (torch.cuda.is_available() is False)")
    return device


def _synchronize(device) -> None:
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


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

    target = _pick_device(device)
    used = resolve_backend("iaf_select", target, backend, cpp_ops=("iaf_select",))
    timings = dict(timings or {})
    start = time.perf_counter()
    if pixels is not None:
        signed = pixels.to(target, torch.float32).reshape(slices.shape[0], -1)
    else:
        # Out of place: on CPU ``to`` returns the tensor that shares memory with ``slices``.
        signed = torch.from_numpy(np.ascontiguousarray(slices)).to(target) * 2.0 - 1.0
    _synchronize(target)
    timings["to_device"] = time.perf_counter() - start

    start = time.perf_counter()
    # The distances for the report come from the same pass that decides the slices.
    keep, distances = medpruner_kernels.iaf_select(signed, gamma, backend=backend, return_distances=True)
    _synchronize(target)
    timings["iaf"] = time.perf_counter() - start
    return PruneResult(
        volume=volume,
        slices=slices,
        window=chosen,
        keep=keep.cpu().numpy().astype(bool),
        distances=distances.cpu().numpy().astype(np.float32),
        timings=timings,
        backend=used,
        device=str(target),
    )


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


def summary_text(record: dict) -> str:
    result, volume, config = record["result"], record["volume"], record["config"]
    window = config["window"]
    window_text = (
        f"{window['name']} (level {window['level']:g}, width {window['width']:g} HU)"
        if window["kind"] == "ct"
        else f"percentiles {window['low_percentile']:g}..{window['high_percentile']:g}"
    )
    timings = ", ".join(f"{name} {seconds * 1000:.1f} ms" for name, seconds in record["timings_s"].items())
    lines = [
        f"volume     {volume['source']}",
        f"           {volume['modality']} {'x'.join(map(str, volume['shape']))} (D x H x W), "
        f"spacing {'x'.join(f'{s:g}' for s in volume['spacing_mm'])} mm, orientation {volume['orientation']}",
        f"           slice axis {volume['slice_axis']}: {volume['slice_axis_reason']}",
        f"window     {window_text}",
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


@dataclass
class TokenOptions:
    """Token-level pruning with a model (DINS + merge inside its ``generate``)."""

    bundle: ModelBundle
    tau: float
    mode: str
    merge: bool
    prompt: str
    resolution: int
    max_new_tokens: int


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
    result = run_iaf(
        volume, slices, chosen, gamma, backend=backend, device=device, timings=timings, pixels=pixels
    )
    token_result = None
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
        )
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


def prune_one(
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
) -> dict:
    start = time.perf_counter()
    volume = load_volume(source, slice_axis=slice_axis, frame=frame)
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
            out_dir, record, result.slices, flips=volume.display_flips(), html_page=html_page, **heatmaps
        )
        record["timings_s"]["report"] = round(time.perf_counter() - start, 6)
        record["report_dir"] = str(out_dir)
    return record


# ------------------------------------------------------------------------------- model (DINS)
# volume_to_inputs names Gemma3 checkpoints by the medical model built on them.
_INPUT_FAMILY = {"qwen3_vl": "qwen3_vl", "qwen2_5_vl": "qwen2_5_vl", "gemma3": "medgemma"}
DEMO_RESOLUTION = 96
MODEL_RESOLUTION = 224
DEFAULT_PROMPT = "Describe the findings in this volume."


@dataclass
class ModelBundle:
    """A loaded VLM ready for ``apply_medpruner``: its processor, the volume_to_inputs family, the
    slice size multiple its processor would otherwise resize to, and a name for reports."""

    model: object
    processor: object
    family: str
    pixel_key: str
    size_multiple: int
    merge_size: int
    name: str


def _size_multiple(processor) -> tuple[int, int]:
    image_processor = getattr(processor, "image_processor", None)
    patch = int(getattr(image_processor, "patch_size", 0) or 0)
    merge = int(getattr(image_processor, "merge_size", 0) or 1)
    return (patch * merge if patch else 32), merge


def _bundle(model, processor, name: str) -> ModelBundle:
    from medpruner.adapters import adapter_for

    try:
        adapter = adapter_for(model)
        family = _INPUT_FAMILY[adapter.family]
    except (TypeError, KeyError) as err:
        raise CommandError(f"--model {name}: {err}") from err
    multiple, merge = _size_multiple(processor)
    return ModelBundle(model, processor, family, adapter.pixel_key, multiple, merge, name)


# Processors that build a video processor (which needs torchvision) next to the image one.
_IMAGE_ONLY_PROCESSORS = {
    "Qwen3VLForConditionalGeneration": "Qwen3VLProcessor",
    "Qwen2_5_VLForConditionalGeneration": "Qwen2_5_VLProcessor",
}


def load_model(path: str, device) -> ModelBundle:
    """A local Hugging Face checkpoint (model + processor); nothing is downloaded."""
    if not Path(path).is_dir():
        raise CommandError(
            f"--model {path}: not a folder (pass a local checkpoint saved with save_pretrained)"
        )
    import transformers

    try:
        model = transformers.AutoModelForImageTextToText.from_pretrained(
            path, local_files_only=True, dtype="auto"
        )
        try:
            processor = transformers.AutoProcessor.from_pretrained(path, local_files_only=True)
        except ImportError:
            class_name = _IMAGE_ONLY_PROCESSORS.get(type(model).__name__)
            if class_name is None:
                raise
            processor = _image_only_processor(
                getattr(transformers, class_name),
                transformers.AutoImageProcessor.from_pretrained(path, local_files_only=True),
                transformers.AutoTokenizer.from_pretrained(path, local_files_only=True),
            )
    except (OSError, ValueError, KeyError, ImportError) as err:
        raise CommandError(
            f"--model {path}: cannot load the checkpoint ({type(err).__name__}: {err})"
        ) from err
    return _bundle(model.to(device).eval(), processor, str(path))


def tiny_qwen3_vl(device, seed: int = 0) -> ModelBundle:
    """A Qwen3-VL of a few hundred thousand random weights with a byte-level tokenizer, built from a
    config (no download): the real architecture and processor path, fast enough for a 2-core demo."""
    from transformers import Qwen3VLProcessor

    from medpruner._tiny import qwen_image_processor, qwen_tokenizer, tiny_qwen3_vl_model

    tokenizer = qwen_tokenizer()
    processor = _image_only_processor(Qwen3VLProcessor, qwen_image_processor(8), tokenizer)
    model = tiny_qwen3_vl_model(tokenizer, seed=seed, device=device)
    return _bundle(model, processor, "tiny random-weight Qwen3-VL (built from a config)")


def model_slices(slices: np.ndarray, resolution: int, multiple: int) -> np.ndarray:
    """[0, 1] slices resized so the longer side is about ``resolution`` and both sides are multiples of
    ``multiple`` (patch x merge): the processor then keeps them as they are, and IAF in the report sees
    exactly the pixels the model sees."""
    import torch

    height, width = slices.shape[1:]
    scale = resolution / max(height, width)
    size = tuple(max(multiple, int(round(n * scale / multiple)) * multiple) for n in (height, width))
    if size == (height, width):
        return np.ascontiguousarray(slices, dtype=np.float32)
    resized = torch.nn.functional.interpolate(
        torch.from_numpy(np.ascontiguousarray(slices, dtype=np.float32))[:, None],
        size=size,
        mode="bilinear",
        align_corners=False,
        antialias=True,
    )[:, 0]
    return resized.clamp_(0.0, 1.0).numpy()


@dataclass
class TokenResult:
    record: dict
    timings: dict[str, float]
    heatmap_slices: list[int]
    importance: list[np.ndarray]
    keep: list[np.ndarray]
    grid: tuple[int, int] | None


def model_inputs(bundle: ModelBundle, slices: np.ndarray, prompt: str):
    """Processor inputs of one volume (one image per slice) on the model's device."""
    import torch

    from medpruner import volume_to_inputs

    inputs = volume_to_inputs(bundle.processor, torch.from_numpy(slices), prompt, family=bundle.family)
    return inputs.to(next(bundle.model.parameters()).device)


def run_model(
    bundle: ModelBundle,
    inputs,
    slice_keep: np.ndarray,
    *,
    gamma: float,
    tau: float,
    mode: str,
    merge: bool,
    backend: str,
    prompt: str,
    max_new_tokens: int,
    max_heatmaps: int = 8,
) -> TokenResult:
    """The whole MedPruner pipeline on a model: IAF + DINS + merge inside its ``generate``.

    ``inputs``: from :func:`model_inputs`; ``slice_keep``: the IAF mask the report computed on the
    same pixels (its kept slices are the ones with heatmaps)."""
    import torch

    from medpruner import apply_medpruner, remove_medpruner

    model = bundle.model
    device = next(model.parameters()).device
    timings = {}
    try:
        apply_medpruner(model, gamma=gamma, tau=tau, mode=mode, merge=merge, backend=backend, record_tokens=True)
    except (TypeError, ValueError) as err:
        raise CommandError(f"--model {bundle.name}: {err}") from err
    start = time.perf_counter()
    try:
        with torch.inference_mode():
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        _synchronize(device)
    finally:
        stats = model.medpruner_stats
        remove_medpruner(model)
    timings["generate"] = time.perf_counter() - start
    timings["prune"] = stats.prune_seconds
    new_tokens = output[0, inputs["input_ids"].shape[1] :]
    tokenizer = getattr(bundle.processor, "tokenizer", bundle.processor)
    text = tokenizer.decode(new_tokens, skip_special_tokens=True)

    grid = None
    if "image_grid_thw" in inputs:
        _, rows, cols = (int(n) for n in inputs["image_grid_thw"][0].tolist())
        grid = (rows // bundle.merge_size, cols // bundle.merge_size)
    tokens_per_slice = [int(n) for n in stats.tokens_per_slice[0]]
    record = {
        "model": bundle.name,
        "family": bundle.family,
        "mode": mode,
        "tau": tau,
        "merge": merge,
        "prompt": prompt,
        "token_grid": None if grid is None else list(grid),
        "slices_kept": int(stats.slices_kept[0]),
        "slices_encoded": int(stats.slices_encoded),
        "tokens_before": int(stats.tokens_before),
        "tokens_after": int(stats.tokens_after),
        "token_retention": float(stats.retention),
        "tokens_per_slice": tokens_per_slice,
        "generated_tokens": int(new_tokens.numel()),
        "generated_text": text,
    }

    importance, keep, shown = [], [], []
    encoded = np.flatnonzero(slice_keep) if mode == "fast" else np.arange(slice_keep.size)
    # The report's IAF ran on the model's own pixels, so the slice selections agree; should they not
    # (an adapter with another slice rule), the report gets no heatmaps rather than misplaced ones.
    # Every slice of a volume has one resolution, so the encoded slices hold equal token counts.
    recorded = stats.token_scores is not None
    token_count = stats.token_scores.numel() if recorded else 0
    per_encoded = token_count // max(len(encoded), 1)
    same_slices = per_encoded > 0 and per_encoded * len(encoded) == token_count
    if mode == "fast":
        same_slices = same_slices and np.array_equal(np.asarray(tokens_per_slice) > 0, slice_keep)
    if same_slices:
        scores, final_keep = stats.token_scores.numpy(), stats.token_keep.numpy()
        offsets = np.arange(len(encoded) + 1) * per_encoded
        position_of = {int(s): p for p, s in enumerate(encoded)}
        kept = np.flatnonzero(slice_keep)
        for index in kept[
            np.unique(np.linspace(0, kept.size - 1, min(max_heatmaps, kept.size)).round().astype(int))
        ]:
            p = position_of[int(index)]
            shown.append(int(index))
            importance.append(scores[offsets[p] : offsets[p + 1]])
            keep.append(final_keep[offsets[p] : offsets[p + 1]].astype(bool))
    return TokenResult(record, timings, shown, importance, keep, grid)


# ------------------------------------------------------------------------------------------- batch
def _has_glob(text: str) -> bool:
    return any(ch in text for ch in "*?[")


def _is_series_folder(folder: Path) -> bool:
    """A folder of DICOM slices, not a folder of volumes: files only, none with a volume suffix."""
    entries = [e for e in folder.iterdir() if not e.name.startswith(".")]
    if any(e.is_dir() for e in entries):
        return False
    files = [e for e in entries if e.is_file()]
    return bool(files) and not any(e.name.lower().endswith(_VOLUME_FILE_SUFFIXES) for e in files)


def _folder_volumes(folder: Path) -> list[Path]:
    found = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith(".") or entry.name == RESULTS_NAME:
            continue
        if entry.is_dir() or entry.name.lower().endswith(SUPPORTED_SUFFIXES):
            found.append(entry)
    return found


def expand_inputs(inputs: list[str]) -> tuple[list[Path], bool]:
    """Paths of the volumes named by ``inputs`` and whether this is a batch (several volumes, a glob,
    or a folder of volumes)."""
    volumes: list[Path] = []
    batch = len(inputs) > 1
    for text in inputs:
        path = Path(text)
        if _has_glob(text) and not path.exists():
            batch = True
            matches = sorted(glob.glob(text, recursive=True))
            if not matches:
                raise CommandError(f"{text}: the pattern matches nothing")
            volumes.extend(Path(m) for m in matches)
        elif path.is_dir() and not _is_series_folder(path):
            batch = True
            volumes.extend(_folder_volumes(path))
        else:
            volumes.append(path)
    return volumes, batch


def _batch_settings(gamma: float, window, slice_axis, frame, tokens: TokenOptions | None) -> dict:
    """Everything a results line depends on besides its file, in its JSON form: a line recorded under
    other settings is not reused."""
    settings = {"gamma": gamma, "window": window, "slice_axis": slice_axis, "frame": frame}
    if tokens is not None:
        settings["tokens"] = {
            "model": tokens.bundle.name,
            **{k: getattr(tokens, k) for k in ("tau", "mode", "merge", "prompt", "resolution", "max_new_tokens")},
        }
    return json.loads(to_json(settings, indent=None))


def _source_stamp(path: Path) -> list[int] | None:
    """Size and newest modification time of a file, or of the files of a series folder: a source
    edited since its line was written is done again."""
    try:
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        stats = [f.stat() for f in files]
    except OSError:
        return None
    return [sum(st.st_size for st in stats), max((st.st_mtime_ns for st in stats), default=0)]


def _resume_state(results: Path, settings: dict) -> dict[str, list[int]]:
    """Sources already done under ``settings``, with the stamp of the file they were done from. A
    source's last line is its current one; a last line cut off by a crash is removed (atomically)
    first."""
    if not results.exists():
        return {}
    text = results.read_text(encoding="utf-8")
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
        atomic_write_text(results, text)
    current = {}
    for line in text.splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict) and "source" in entry:
            current[entry["source"]] = entry
    return {
        source: entry.get("source_stamp")
        for source, entry in current.items()
        if entry.get("status") == "ok" and entry.get("settings") == settings
    }


def _append_line(results: Path, entry: dict) -> None:
    # One write of one whole line on an O_APPEND descriptor: a crash leaves at most a cut-off last line,
    # which the next run's _resume_state removes.
    data = (to_json(entry, indent=None) + "\n").encode("utf-8")
    descriptor = os.open(results, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(descriptor, data)
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _progress(total: int):
    if not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="volume", file=sys.stderr)


def _read_and_window(path: Path, window, slice_axis, frame):
    start = time.perf_counter()
    volume = load_volume(path, slice_axis=slice_axis, frame=frame)
    load_seconds = time.perf_counter() - start
    slices, chosen, window_seconds = window_volume(volume, window)
    return volume, slices, chosen, {"load": load_seconds, "window": window_seconds}


def prune_batch(
    paths: list[Path],
    *,
    out_dir: Path,
    gamma: float,
    window,
    slice_axis,
    frame,
    backend: str,
    device: str,
    workers: int,
    as_json: bool,
    tokens: TokenOptions | None = None,
) -> int:
    """Read and window on a thread pool (file decoding and numpy release the GIL), run IAF in this
    thread, append one JSON line per volume to ``results.jsonl``. Volumes already recorded as ``ok``
    under the same settings, from a file unchanged since, are skipped; a failing volume is recorded
    with its error and the run goes on (status 1 at the end). When a source appears several times in
    the file, its last line is the current one."""
    out_dir.mkdir(parents=True, exist_ok=True)
    results = out_dir / RESULTS_NAME
    settings = _batch_settings(gamma, window, slice_axis, frame, tokens)
    done = _resume_state(results, settings)
    # Stamped before any read: an edit during the run makes the next run redo the volume.
    stamps = {path: _source_stamp(path) for path in paths}
    pending = [p for p in paths if done.get(str(p.resolve()), "not done") != stamps[p]]
    skipped = len(paths) - len(pending)
    failures: list[tuple[str, str]] = []
    processed = 0
    bar = _progress(len(pending))
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        # A bounded window of reads in flight keeps memory at a few volumes, whatever the batch size.
        ahead = max(2, 2 * workers)
        futures = [pool.submit(_read_and_window, p, window, slice_axis, frame) for p in pending[:ahead]]
        for position, path in enumerate(pending):
            if position + ahead < len(pending):
                futures.append(
                    pool.submit(_read_and_window, pending[position + ahead], window, slice_axis, frame)
                )
            source = str(path.resolve())
            try:
                volume, slices, chosen, timings = futures[position].result()
                futures[position] = None
                record, result, _ = prune_loaded(
                    volume,
                    slices,
                    chosen,
                    timings,
                    gamma=gamma,
                    backend=backend,
                    device=device,
                    tokens=tokens,
                )
                entry = {
                    "source": source,
                    "source_stamp": stamps[path],
                    "settings": settings,
                    "status": "ok",
                    **{k: record["result"][k] for k in ("num_slices", "kept", "retention", "kept_indices")},
                    "distance_to_anchor": record["result"]["distance_to_anchor"],
                    "shape": record["volume"]["shape"],
                    "spacing_mm": record["volume"]["spacing_mm"],
                    "modality": record["volume"]["modality"],
                    "slice_axis": record["volume"]["slice_axis"],
                    "gamma": gamma,
                    "window": record["config"]["window"],
                    "backend": result.backend,
                    "device": result.device,
                    "timings_s": record["timings_s"],
                }
                if "tokens" in record:
                    entry["tokens"] = record["tokens"]
                processed += 1
            except (VolumeError, ValueError, TypeError, RuntimeError, OSError) as err:
                futures[position] = None
                message = str(err) if isinstance(err, VolumeError) else f"{path}: {type(err).__name__}: {err}"
                failures.append((source, message))
                entry = {"source": source, "status": "error", "error": message}
                print(f"medpruner: skipping {message}", file=sys.stderr)
            _append_line(results, entry)
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    summary = {
        "results": str(results),
        "volumes": len(paths),
        "processed": processed,
        "already_done": skipped,
        "failed": len(failures),
        "failures": [{"source": s, "error": e} for s, e in failures],
    }
    if as_json:
        print(to_json(summary, indent=None))
    else:
        print(
            f"{processed} volume(s) processed, {skipped} already in {results}, {len(failures)} failed"
            + "".join(f"\n  failed: {message}" for _, message in failures)
        )
    return 1 if failures else 0


# ---------------------------------------------------------------------------------------- commands
def _package_file(package: str, relative: str) -> Path | None:
    # find_spec locates a top-level package without importing it (nilearn's import pulls sklearn).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        candidate = Path(root) / relative
        if candidate.is_file():
            return candidate
    return None


def demo_volume_path() -> Path:
    """The MNI152 T1 template that ships with nilearn, else nibabel's small anatomical test image."""
    for package, relative in (MNI_TEMPLATE, NIBABEL_SAMPLE):
        found = _package_file(package, relative)
        if found is not None:
            return found
    raise CommandError(
        "demo: no bundled volume found; install nilearn (MNI152 template) or nibabel (its test data), "
        "or run `medpruner prune YOUR_VOLUME`"
    )


def _token_options(args, bundle: ModelBundle, resolution: int) -> TokenOptions:
    return TokenOptions(
        bundle=bundle,
        tau=DEFAULT_TAU if args.tau is None else args.tau,
        mode=args.mode or "fast",
        merge=not args.no_merge,
        prompt=args.prompt,
        resolution=args.resolution or resolution,
        max_new_tokens=args.max_new_tokens,
    )


def _report_files(out_dir: Path) -> str:
    names = sorted(p.name for p in out_dir.iterdir() if not p.name.startswith("."))
    return f"{out_dir}: {', '.join(names)}"


# Options that only a model run uses (None/False when not given).
_TOKEN_ONLY = ("tau", "mode", "no_merge", "resolution")


def cmd_prune(args) -> int:
    paths, batch = expand_inputs(args.volumes)
    if batch:
        if args.out is None:
            raise CommandError("several volumes need --out DIR (results.jsonl is written there)")
        if not paths:
            raise CommandError(f"no volumes found in {' '.join(args.volumes)}")
    if args.model is None:
        token_only = [
            f"--{name.replace('_', '-')}" for name in _TOKEN_ONLY if getattr(args, name) not in (None, False)
        ]
        if token_only:
            raise CommandError(f"{', '.join(token_only)}: token-level options need --model")
    tokens = None
    if args.model is not None:
        tokens = _token_options(args, load_model(args.model, _pick_device(args.device)), MODEL_RESOLUTION)
    common = dict(
        gamma=args.gamma,
        window=args.window,
        slice_axis=args.slice_axis,
        frame=args.frame,
        backend=args.backend,
        device=args.device,
        tokens=tokens,
    )
    if batch:
        return prune_batch(paths, out_dir=Path(args.out), workers=args.workers, as_json=args.json, **common)
    out_dir = None if args.out is None else Path(args.out)
    record = prune_one(paths[0], out_dir=out_dir, html_page=not args.no_html, **common)
    print(to_json(record) if args.json else summary_text(record))
    if out_dir is not None and not args.json:
        print(f"report     {_report_files(out_dir)}")
    return 0


def cmd_demo(args) -> int:
    source = demo_volume_path()
    out_dir = Path(args.out)
    device = _pick_device(args.device)
    if args.model is None:
        bundle = tiny_qwen3_vl(device)
    else:
        bundle = load_model(args.model, device)
    record = prune_one(
        source,
        gamma=args.gamma,
        window="auto",
        slice_axis=None,
        frame=None,
        backend=args.backend,
        device=args.device,
        out_dir=out_dir,
        tokens=_token_options(args, bundle, DEMO_RESOLUTION if args.model is None else MODEL_RESOLUTION),
        extra_config={"demo": True},
        html_page=not args.no_html,
    )
    if args.json:
        print(to_json(record))
    else:
        print(summary_text(record))
        print(f"report     {_report_files(out_dir)}")
    return 0


def _bench_folder(explicit: str | None) -> Path | None:
    if explicit is not None:
        path = Path(explicit)
        return path if path.is_dir() else None
    candidates = [Path.cwd() / "bench"]
    spec = importlib.util.find_spec("medpruner_kernels")
    if spec is not None and spec.origin:
        candidates.append(Path(spec.origin).resolve().parent.parent / "bench")
    return next((c for c in candidates if c.is_dir()), None)


def cmd_bench(args) -> int:
    folder = _bench_folder(args.bench_dir)
    if folder is None:
        where = args.bench_dir or "./bench or next to medpruner_kernels"
        print(
            f"medpruner bench: no bench/ folder found ({where}); the microbenchmarks ship with the source "
            "tree, not with the installed package: run this from a checkout",
            file=sys.stderr,
        )
        return 1
    if importlib.util.find_spec("pytest_benchmark") is None:
        print("medpruner bench: needs pytest-benchmark (pip install pytest-benchmark)", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="medpruner-bench-") as scratch:
        results = Path(scratch) / "benchmarks.json"
        command = [
            sys.executable,
            "-m",
            "pytest",
            str(folder),
            "--benchmark-only",
            "-q",
            # The checkout's pyproject sets this too, but a bench/ folder elsewhere has no config.
            "-o",
            "python_files=bench_*.py",
            f"--benchmark-json={results}",
            *args.pytest_args,
        ]
        print("running: " + " ".join(command), file=sys.stderr)
        # pytest's own output goes to stderr, line by line as it comes, so stdout carries only the
        # table (or the JSON).
        with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as child:
            for line in child.stdout:
                sys.stderr.write(line)
        status = child.returncode
        rows = bench_rows(json.loads(results.read_text())) if results.exists() else []
    if args.json:
        print(to_json(rows, indent=None))
    elif rows:
        print(bench_table(rows))
    else:
        print("medpruner bench: no benchmark ran", file=sys.stderr)
    return status


def bench_rows(report: dict) -> list[dict]:
    """One row per benchmark of a pytest-benchmark JSON report, in milliseconds."""
    rows = []
    for bench in report.get("benchmarks", []):
        stats = bench.get("stats", {})
        rows.append(
            {
                "group": bench.get("group") or "",
                "name": bench.get("name", ""),
                "median_ms": 1e3 * float(stats.get("median", math.nan)),
                "mean_ms": 1e3 * float(stats.get("mean", math.nan)),
                "min_ms": 1e3 * float(stats.get("min", math.nan)),
                "rounds": int(stats.get("rounds", 0)),
            }
        )
    return rows


def bench_table(rows: list[dict]) -> str:
    """Rows grouped as pytest-benchmark groups them, each with its speedup over the group's slowest
    (the eager baseline in bench/)."""
    headers = ("group", "benchmark", "median ms", "min ms", "rounds", "speedup")
    lines = []
    for group in dict.fromkeys(row["group"] for row in rows):
        members = [row for row in rows if row["group"] == group]
        slowest = max(row["median_ms"] for row in members)
        for row in members:
            speedup = slowest / row["median_ms"] if row["median_ms"] > 0 else math.nan
            lines.append(
                (
                    group,
                    row["name"],
                    f"{row['median_ms']:.3f}",
                    f"{row['min_ms']:.3f}",
                    str(row["rounds"]),
                    f"{speedup:.1f}x",
                )
            )
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(headers)]
    numeric = {2, 3, 4, 5}

    def fmt(cells):
        return "  ".join(
            c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))
        )

    return "\n".join([fmt(headers), fmt(["-" * w for w in widths]), *(fmt(line) for line in lines)])


# ------------------------------------------------------------------------------------------ parser
def _gamma(text: str) -> float:
    try:
        value = float(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"gamma must be a number, got {text!r}") from err
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"gamma must be finite, got {text!r}")
    return value


def _tau(text: str) -> float:
    try:
        value = float(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"tau must be a number, got {text!r}") from err
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"tau must be in (0, 1], got {text!r}")
    return value


def _window(text: str) -> str:
    try:
        resolve_window(text)
    except (ValueError, TypeError) as err:
        raise argparse.ArgumentTypeError(str(err)) from err
    return text


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from err
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--gamma",
        type=_gamma,
        default=DEFAULT_GAMMA,
        help="IAF threshold: mean |slice difference| on the models' [-1, 1] scale (default 0.05, as in the paper)",
    )
    parser.add_argument("--backend", choices=("auto", "triton", "cpp", "torch"), default="auto")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    parser.add_argument(
        "--json", action="store_true", help="print machine-readable JSON instead of a summary"
    )


def _add_model_options(parser: argparse.ArgumentParser, model_help: str) -> None:
    parser.add_argument("--model", default=None, help=model_help)
    parser.add_argument(
        "--tau", type=_tau, default=None, help="DINS nucleus mass kept per slice, in (0, 1] (default 0.9)"
    )
    parser.add_argument(
        "--mode",
        choices=("fast", "paper"),
        default=None,
        help="fast: IAF before the vision tower (dropped slices are never encoded); paper: the paper's code",
    )
    parser.add_argument("--no-merge", action="store_true", help="drop pruned tokens instead of merging them")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="question asked about the volume")
    parser.add_argument(
        "--resolution",
        type=_positive_int,
        default=None,
        help=f"longer slice side fed to the model (default {MODEL_RESOLUTION}; demo's tiny model {DEMO_RESOLUTION})",
    )
    parser.add_argument(
        "--max-new-tokens", type=_positive_int, default=8, help="tokens to generate (default 8)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medpruner", description="Training-free visual-token pruning for 3D medical volumes (MedPruner)."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    prune = commands.add_parser(
        "prune",
        help="drop near-duplicate slices (IAF) of one volume or many",
        description="One volume: prints a summary (or --json) and writes a report with --out. Several "
        "volumes (a folder of volumes, a glob or several paths): needs --out, appends one JSON line per "
        "volume to OUT/results.jsonl, resumes where it stopped (a volume recorded under other settings, "
        "or edited since, is done again), and goes on past bad files.",
    )
    prune.add_argument(
        "volumes",
        nargs="+",
        metavar="VOLUME",
        help="NIfTI/MGH/NRRD/.npy/.npz/DICOM file, DICOM series folder, folder of volumes, or glob",
    )
    _add_run_options(prune)
    prune.add_argument(
        "--window",
        type=_window,
        default="auto",
        help=f"CT window: {'|'.join(CT_WINDOWS)}, LEVEL,WIDTH in HU (a negative level as "
        "--window=-600,1500), 'percentile' (MRI), or auto (default: the DICOM's window or abdomen for CT, "
        "percentiles otherwise)",
    )
    prune.add_argument("--slice-axis", type=int, choices=(0, 1, 2), default=None, help="axis to slice along")
    prune.add_argument("--frame", type=int, default=None, help="frame of a 4D image")
    prune.add_argument("--out", default=None, help="report folder (one volume) or results folder (batch)")
    prune.add_argument("--no-html", action="store_true", help="skip the self-contained report.html")
    prune.add_argument(
        "--workers", type=_positive_int, default=min(4, os.cpu_count() or 1), help="batch readers"
    )
    _add_model_options(
        prune, "local VLM checkpoint folder: adds token-level pruning (DINS) inside its generate"
    )
    prune.set_defaults(handler=cmd_prune)

    demo = commands.add_parser(
        "demo", help="run the whole pipeline on the MNI152 brain MRI that ships with nilearn, write a report"
    )
    _add_run_options(demo)
    demo.add_argument("--out", default="medpruner-demo", help="report folder (default ./medpruner-demo)")
    demo.add_argument("--no-html", action="store_true", help="skip the self-contained report.html")
    _add_model_options(demo, "local VLM checkpoint folder (default: a tiny random-weight Qwen3-VL)")
    demo.set_defaults(handler=cmd_demo)

    bench = commands.add_parser("bench", help="run the bench/ microbenchmarks (pytest-benchmark)")
    bench.add_argument(
        "--bench-dir", default=None, help="benchmark folder (default ./bench or the checkout's)"
    )
    bench.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    bench.add_argument("pytest_args", nargs=argparse.REMAINDER, help="extra arguments for pytest")
    bench.set_defaults(handler=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # pytest options for ``bench`` start with "-", which argparse would take for its own.
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        if args.command != "bench":
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        args.pytest_args = [*unknown, *args.pytest_args]
    try:
        return args.handler(args)
    except CommandError as err:
        print(f"medpruner: error: {err}", file=sys.stderr)
        return 2
    except VolumeError as err:
        print(f"medpruner: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
