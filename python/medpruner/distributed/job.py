"""``medpruner prune --engine ray``: the batch mode of :mod:`medpruner.cli.batch` as a Ray Data job.

Stages, per volume (one row each):

1. a CPU task reads and windows the volume; without a model it also runs IAF and makes the results line;
   with a model it drops the raw voxels and hands on the windowed slices only;
2. with a model, an actor pool (each actor loads the model once) runs the whole pipeline on them.

The driver streams the finished lines into ``OUT/results.jsonl`` as they arrive (one fsynced write per
line, the batch mode's file, resume key and line format), so a killed worker or driver loses no finished
line, a rerun skips what is done, and batch and Ray runs resume each other's files. With ``shard_rows``
the lines go to shards ``OUT/results-<k>.jsonl`` of that many lines (:mod:`.shards`); the job's resume
reads ``results.jsonl`` and every shard, in that order, with the batch mode's key (the batch mode itself
reads ``results.jsonl`` only).
"""

from __future__ import annotations

import csv
import json
import pickle
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from medpruner.cli.batch import (
    RESULTS_NAME,
    ROW_ERRORS,
    _append_line,
    _batch_settings,
    _read_and_window,
    _resume_state,
    _source_stamp,
    batch_entry,
    error_entry,
    expand_inputs,
)
from medpruner.cli.common import CommandError, pick_device
from medpruner.cli.models import TINY_QWEN3_VL_NAME, TokenOptions, load_model, model_name, tiny_qwen3_vl
from medpruner.cli.prune import prune_loaded
from medpruner.distributed.shards import ShardWriter, shard_files
from medpruner.report import to_json

__all__ = ["ModelRef", "ModelStage", "RayOptions", "connect", "prune_job", "read_manifest"]

MANIFEST_COLUMNS = ("path", "volume", "source", "file")


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide the job runs. ``address``: an existing cluster (``auto``, ``ray://host:10001``
    or ``host:6379``); without it a local one of ``num_cpus`` CPUs and ``object_store_mb`` of object
    store. ``workers``: model actors (without a model: CPU tasks in flight); ``gpus_per_actor`` and
    ``batch_size`` (volumes per model call) of the actor pool."""

    address: str | None = None
    workers: int = 1
    gpus_per_actor: float = 0.0
    batch_size: int = 1
    num_cpus: int = 2
    object_store_mb: int = 256


@dataclass(frozen=True)
class ModelRef:
    """A model each actor loads for itself (weights never travel through the object store): a local
    checkpoint folder, or ``None`` for the tiny random-weight Qwen3-VL. ``name`` is the one the batch
    mode records, so the resume key is the same."""

    path: str | None = None

    @property
    def name(self) -> str:
        return TINY_QWEN3_VL_NAME if self.path is None else model_name(self.path)

    def load(self, device):
        return tiny_qwen3_vl(device) if self.path is None else load_model(self.path, device)


class _DroppedVoxels:
    """Stands in for a volume's voxel array once the slices are windowed: the record needs only its
    shape and dtype, and the raw voxels should not travel to the model stage."""

    def __init__(self, shape, dtype) -> None:
        self.shape, self.dtype = tuple(shape), dtype


def read_manifest(inputs: list[str]) -> list[Path]:
    """Volumes named by a manifest: one ``.txt`` file (a path a line, ``#`` comments) or ``.csv`` file
    (a ``path``/``volume``/``source``/``file`` column, else the first), paths relative to the manifest's
    folder; anything else as the batch mode reads it (files, folders of volumes, globs)."""
    if len(inputs) == 1 and Path(inputs[0]).suffix.lower() in (".txt", ".csv") and Path(inputs[0]).is_file():
        manifest = Path(inputs[0])
        if manifest.suffix.lower() == ".txt":
            lines = manifest.read_text(encoding="utf-8").splitlines()
            names = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        else:
            with open(manifest, newline="", encoding="utf-8") as handle:
                rows = list(csv.reader(handle))
            if not rows:
                raise CommandError(f"{manifest}: the manifest is empty")
            header = [cell.strip().lower() for cell in rows[0]]
            column = next((header.index(c) for c in MANIFEST_COLUMNS if c in header), None)
            body = rows[1:] if column is not None else rows
            names = [row[column or 0].strip() for row in body if row and row[column or 0].strip()]
        paths = [p if p.is_absolute() else manifest.parent / p for p in map(Path, names)]
    else:
        paths, _ = expand_inputs(inputs)
    if not paths:
        raise CommandError(f"no volumes found in {' '.join(inputs)}")
    return paths


def connect(options: RayOptions) -> bool:
    """Join ``options.address`` or start a local cluster; True when this call started Ray (the caller
    shuts it down). A Ray session already open in this process is used as it is."""
    import ray

    if ray.is_initialized():
        return False
    if options.address:
        ray.init(address=options.address, log_to_driver=False)
    else:
        # Logical CPUs: each model actor holds one for its life, and the reading tasks need one more,
        # else --workers 2 on 2 CPUs would wait forever for a reader.
        ray.init(
            num_cpus=max(options.num_cpus, options.workers + 1),
            include_dashboard=False,
            object_store_memory=options.object_store_mb * 1024 * 1024,
            log_to_driver=False,
        )
    return True


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def load_stage(row: dict, *, window, slice_axis, frame, gamma, backend, device, settings, with_model) -> dict:
    """CPU task: read and window one volume; IAF and its results line too when no model follows."""
    path = Path(row["path"])
    out = {"source": row["source"], "entry": "", "payload": b"", "node": _node_id()}
    try:
        volume, slices, chosen, timings = _read_and_window(path, window, slice_axis, frame)
        if with_model:
            volume = replace(volume, data=_DroppedVoxels(volume.data.shape, volume.data.dtype))
            out["payload"] = pickle.dumps((volume, slices, chosen, timings), protocol=5)
        else:
            record, result, _ = prune_loaded(
                volume, slices, chosen, timings, gamma=gamma, backend=backend, device=device
            )
            entry = batch_entry(row["source"], json.loads(row["stamp"]), settings, gamma, record, result)
            out["entry"] = to_json(entry, indent=None)
    except ROW_ERRORS as err:
        entry = error_entry(path, row["source"], err, json.loads(row["stamp"]), settings)
        out["entry"] = to_json(entry, indent=None)
    return out


class ModelStage:
    """An actor of the model pool: loads the model once, then runs the pipeline on each windowed volume
    of a batch (rows already finished, the failures of the CPU stage, pass through)."""

    def __init__(self, model: ModelRef, tokens: TokenOptions, *, gamma, backend, device, settings) -> None:
        self.tokens = replace(tokens, bundle=model.load(pick_device(device)))
        self.gamma, self.backend, self.device, self.settings = gamma, backend, device, settings

    def __call__(self, batch: dict) -> dict:
        entries, nodes = [], []
        for source, path, stamp, entry, payload, node in zip(
            batch["source"], batch["path"], batch["stamp"], batch["entry"], batch["payload"], batch["node"]
        ):
            if not entry:
                entry = to_json(self.run_one(str(source), str(path), json.loads(stamp), payload), indent=None)
                node = _node_id()
            entries.append(entry)
            nodes.append(node)
        return {"source": batch["source"], "entry": entries, "node": nodes}

    def run_one(self, source: str, path: str, stamp, payload: bytes) -> dict:
        volume, slices, chosen, timings = pickle.loads(payload)
        try:
            record, result, _ = prune_loaded(
                volume, slices, chosen, timings, gamma=self.gamma, backend=self.backend, device=self.device,
                tokens=self.tokens,
            )
        except ROW_ERRORS as err:
            return error_entry(Path(path), source, err, stamp, self.settings)
        return batch_entry(source, stamp, self.settings, self.gamma, record, result)


def prune_job(
    paths: list[Path],
    *,
    out_dir: Path,
    gamma: float,
    window,
    slice_axis,
    frame,
    backend: str,
    device: str,
    options: RayOptions,
    model: ModelRef | None = None,
    tokens: TokenOptions | None = None,
    as_json: bool = False,
    model_stage: type = ModelStage,
    shard_rows: int | None = None,
) -> tuple[int, dict]:
    """Run (or resume) the job into ``out_dir/results.jsonl`` -> (exit status, summary). ``tokens``
    (with ``model``): the model run's options, its ``bundle`` replaced by each actor's own model.
    ``model_stage``: the actor class (a subclass may wrap :meth:`ModelStage.run_one`); ``shard_rows``:
    lines per shard ``results-<k>.jsonl`` (default: all in ``results.jsonl``)."""
    import ray

    if (model is None) != (tokens is None):
        raise ValueError("model and tokens: give both (a model run) or neither")
    if tokens is not None:
        tokens = replace(tokens, bundle=model)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = out_dir / RESULTS_NAME
    settings = _batch_settings(gamma, window, slice_axis, frame, tokens)
    done = _resume_state([results, *shard_files(results.parent, results.stem)], settings)
    shards = None if shard_rows is None else ShardWriter(out_dir, results.stem, shard_rows)
    stamps = {path: _source_stamp(path) for path in paths}
    pending = [p for p in paths if done.get(str(p.resolve()), "not done") != stamps[p]]
    items = [
        {"source": str(p.resolve()), "path": str(p), "stamp": json.dumps(stamps[p])} for p in pending
    ]
    started = connect(options)
    start = time.perf_counter()
    failures, processed, nodes = [], 0, set()
    try:
        if items:
            dataset = ray.data.from_items(items, override_num_blocks=len(items))
            dataset = dataset.map(
                _with_inputs(load_stage),
                fn_kwargs=dict(
                    window=window, slice_axis=slice_axis, frame=frame, gamma=gamma, backend=backend,
                    device=device, settings=settings, with_model=model is not None,
                ),
                num_cpus=1,
                concurrency=None if model is not None else options.workers,
            )
            if model is not None:
                dataset = dataset.map_batches(
                    model_stage,
                    fn_constructor_args=(model, tokens),
                    fn_constructor_kwargs=dict(gamma=gamma, backend=backend, device=device, settings=settings),
                    batch_size=options.batch_size,
                    batch_format="numpy",
                    concurrency=options.workers,
                    num_cpus=1,
                    num_gpus=options.gpus_per_actor or None,
                    # A killed actor is restarted and its batch retried (Ray Data's defaults, stated here
                    # because they are the job's contract); remote args that differ from the CPU
                    # stage's also keep reading out of the model actors (Ray Data fuses equal ones).
                    max_restarts=-1,
                    max_task_retries=-1,
                )
            for row in dataset.select_columns(["entry", "node"]).iter_rows():
                entry = json.loads(row["entry"])
                if shards is None:
                    _append_line(results, entry)
                else:
                    shards.write(to_json(entry, indent=None))
                nodes.add(row["node"])
                if entry["status"] == "ok":
                    processed += 1
                else:
                    failures.append((entry["source"], entry["error"]))
                    print(f"medpruner: skipping {entry['error']}", file=sys.stderr)
    finally:
        if started:
            ray.shutdown()
    seconds = time.perf_counter() - start
    summary = {
        "engine": "ray",
        "results": str(results),
        "shards": [p.name for p in shard_files(out_dir, results.stem)],
        "volumes": len(paths),
        "processed": processed,
        "already_done": len(paths) - len(pending),
        "failed": len(failures),
        "failures": [{"source": s, "error": e} for s, e in failures],
        "seconds": round(seconds, 3),
        "volumes_per_second": round(len(pending) / seconds, 3) if pending else None,
        "nodes": len(nodes),
    }
    line = (
        f"{processed} volume(s) processed, {summary['already_done']} already in {results}, "
        f"{len(failures)} failed; {len(pending)} in {seconds:.1f} s "
        f"({summary['volumes_per_second'] or 0:.2f} volumes/s) on {len(nodes)} node(s)"
    )
    print(to_json(summary, indent=None) if as_json else line + "".join(f"\n  failed: {e}" for _, e in failures))
    return (1 if failures else 0), summary


def _with_inputs(stage):
    """The row's own columns (path, stamp) carried past a stage, for the model stage after it."""

    def run(row: dict, **kwargs) -> dict:
        return {"path": row["path"], "stamp": row["stamp"], **stage(row, **kwargs)}

    return run
