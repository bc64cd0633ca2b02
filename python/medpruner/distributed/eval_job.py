"""``medpruner eval --engine ray``: :func:`medpruner.eval.runner.run_eval` as a Ray Data job.

Stages, per sample that misses a record (one row each):

1. a CPU task loads the sample's volume (windowed, [0, 1]); a volume that cannot be loaded becomes the
   summary's failed-sample entry, as in the single-process run;
2. an actor pool (each actor loads the model once) runs :func:`~medpruner.eval.runner.eval_sample` on it:
   the same seeds (``seed + index`` of the sample in the dataset), records and resume keys.

The driver appends each sample's records to ``OUT/samples.jsonl`` (with ``shard_rows``: to shards
``OUT/samples-<k>.jsonl`` of that many records, see :mod:`.shards`) as its row arrives (a killed actor's
batch is retried by Ray and only finished rows reach the driver, so none is lost or written twice), then
writes the same summary and report as the single-process run. Both engines resume each other's files.
"""

from __future__ import annotations

import json
import pickle
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from medpruner.cli.common import pick_device
from medpruner.distributed.job import RayOptions, _node_id, connect
from medpruner.distributed.shards import ShardWriter
from medpruner.eval.readers import Dataset, DatasetError
from medpruner.eval.runner import EvalSettings, _append, eval_sample, finish_eval, load_failure, plan_eval

__all__ = ["EvalModelRef", "EvalStage", "eval_job"]

@dataclass(frozen=True)
class EvalModelRef:
    """The eval model each actor loads for itself (weights never travel through the object store): a
    local checkpoint folder, or ``None`` for ``medpruner eval``'s default model; slices resized to
    ``resolution``. ``name`` is the one the single-process run records (it is part of the resume key);
    an actor whose model reports another name stops the job."""

    path: str | None
    resolution: int
    device: str = "auto"

    @property
    def name(self) -> str:
        from medpruner.cli.models import TINY_VQA_NAME

        return TINY_VQA_NAME if self.path is None else str(self.path)

    def load(self):
        from medpruner.cli.eval import eval_model

        model = eval_model(self.path, pick_device(self.device), self.resolution)
        if model.name != self.name:
            raise RuntimeError(f"the actor loaded {model.name!r}, the job keys its records by {self.name!r}")
        return model


def load_stage(row: dict, *, window) -> dict:
    """CPU task: the sample's volume, or its load failure."""
    sample = pickle.loads(row["sample"])
    out = {"index": row["index"], "sample": row["sample"], "existing": row["existing"], "payload": b"",
           "failure": "", "node": _node_id()}
    try:
        out["payload"] = pickle.dumps(sample.load(window), protocol=5)
    except DatasetError as err:
        out["failure"] = json.dumps(load_failure(sample, err))
    return out


class EvalStage:
    """An actor of the model pool: loads the model once, then makes the missing records of each loaded
    sample of a batch (load failures pass through)."""

    def __init__(self, model: EvalModelRef, settings: EvalSettings, methods: list[str], settings_id: str,
                 unavailable: dict) -> None:
        self.model = model.load()
        self.settings, self.methods, self.settings_id, self.unavailable = settings, methods, settings_id, unavailable

    def __call__(self, batch: dict) -> dict:
        records, nodes = [], []
        for index, sample, existing, payload, failure, node in zip(
            batch["index"], batch["sample"], batch["existing"], batch["payload"], batch["failure"], batch["node"]
        ):
            made = []
            if not failure:
                made = self.run_one(int(index), pickle.loads(sample), json.loads(existing), pickle.loads(payload))
                node = _node_id()
            records.append(json.dumps(made, allow_nan=False))
            nodes.append(node)
        return {"index": batch["index"], "records": records, "failure": batch["failure"], "node": nodes}

    def run_one(self, index: int, sample, existing: dict, volume) -> list[dict]:
        return list(eval_sample(self.model, sample, index, volume, self.methods, self.settings, self.settings_id,
                                existing, self.unavailable))


def eval_job(dataset: Dataset, model: EvalModelRef, settings: EvalSettings, out_dir, *, options: RayOptions,
             html: bool = True, stage: type = EvalStage, shard_rows: int | None = None) -> dict:
    """Run (or resume) the eval into ``out_dir`` on Ray and return the summary (the single-process run's,
    written with its report); a line with counts and throughput goes to stderr. ``stage``: the actor
    class (a subclass may wrap :meth:`EvalStage.run_one`); ``shard_rows``: records per shard
    ``samples-<k>.jsonl`` (default: all in ``samples.jsonl``)."""
    import ray

    out_dir = Path(out_dir)
    plan = plan_eval(dataset, model.name, settings, out_dir)
    shards = None if shard_rows is None else ShardWriter(out_dir, plan.records_path.stem, shard_rows)
    pending = plan.pending()
    items = [
        {"index": index, "sample": pickle.dumps(sample, protocol=5), "existing": json.dumps(plan.existing(sample))}
        for index, sample in pending
    ]
    started = connect(options)
    start = time.perf_counter()
    failed: list[tuple[int, dict]] = []
    written, nodes = 0, set()
    try:
        if items:
            data = ray.data.from_items(items, override_num_blocks=len(items))
            data = data.map(load_stage, fn_kwargs={"window": settings.window}, num_cpus=1)
            data = data.map_batches(
                stage,
                fn_constructor_args=(model, settings, plan.methods, plan.settings_id, plan.unavailable),
                batch_size=options.batch_size,
                batch_format="numpy",
                concurrency=options.workers,
                num_cpus=1,
                num_gpus=options.gpus_per_actor or None,
                # as in the prune job: a killed actor is restarted and its batch retried
                max_restarts=-1,
                max_task_retries=-1,
            )
            with open(plan.records_path, "a", encoding="utf-8") as handle:
                for row in data.select_columns(["index", "records", "failure", "node"]).iter_rows():
                    nodes.add(row["node"])
                    if row["failure"]:
                        failed.append((int(row["index"]), json.loads(row["failure"])))
                        continue
                    for record in json.loads(row["records"]):
                        plan.done[record["key"]] = record
                        if shards is None:
                            _append(handle, record)
                        else:
                            shards.write(json.dumps(record, allow_nan=False))
                        written += 1
    finally:
        if started:
            ray.shutdown()
    seconds = time.perf_counter() - start
    summary = finish_eval(plan, dataset, model.name, settings, out_dir, [f for _, f in sorted(failed)], html=html)
    ran = len(pending) - len(failed)
    print(
        f"medpruner eval (ray): {ran} sample(s) run, {len(plan.samples) - len(pending)} already done, "
        f"{len(failed)} failed, {written} record(s) written in {seconds:.1f} s "
        f"({ran / seconds if pending else 0:.2f} samples/s) on {len(nodes)} node(s)",
        file=sys.stderr,
    )
    return summary
