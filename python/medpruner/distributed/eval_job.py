"""``medpruner eval --engine ray``: :func:`medpruner.eval.runner.run_eval` as a Ray Data job.

Stages, per sample that misses a record (one row each):

1. a CPU task loads the sample's volume (windowed, [0, 1]); a volume that cannot be loaded becomes the
   summary's failed-sample entry, as in the single-process run;
2. an actor pool (each actor loads the model once) runs :func:`~medpruner.eval.runner.eval_sample` on it:
   the same seeds (``seed + index`` of the sample in the dataset), records and resume keys.

:class:`RayEvalEngine` yields each sample's records as its row arrives (a killed actor's batch is retried by
Ray and only finished rows reach the driver, so none is lost or written twice); the eval's one driver
(:func:`medpruner.eval.runner.drive_eval`) appends them to ``OUT/samples.jsonl`` (with ``shard_rows``: to
shards ``OUT/samples-<k>.jsonl`` of that many records, see :mod:`.shards`), then writes the same summary
and report as the single-process run. Both engines resume each other's files.
"""

from __future__ import annotations

import json
import pickle
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from medpruner.cli.common import pick_device
from medpruner.distributed.job import RayOptions, _node_id, connect
from medpruner.distributed.shards import ShardWriter
from medpruner.eval.readers import Dataset, DatasetError
from medpruner.eval.runner import (
    RECORDS_NAME,
    EngineEvent,
    EvalPlan,
    EvalSettings,
    drive_eval,
    eval_sample,
    load_failure,
)

__all__ = ["EvalModelRef", "EvalStage", "RayEvalEngine", "eval_job"]


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
        from medpruner.cli.models import model_name, tiny_vqa_name

        return tiny_vqa_name(1) if self.path is None else model_name(self.path)

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


@dataclass
class RayEvalEngine:
    """The eval engine over Ray Data: a CPU task loads each pending sample, an actor pool (``stage``)
    makes its records; a row's records are yielded as it arrives. After a run: ``pending`` and
    ``already_done`` samples, ``failed`` loads, records ``written``, ``nodes`` and ``seconds`` (from
    connecting to the cluster to shutting it down)."""

    model: EvalModelRef
    options: RayOptions
    stage: type = EvalStage
    label: str = "medpruner eval (ray)"
    pending: int = 0
    already_done: int = 0
    failed: int = 0
    written: int = 0
    seconds: float = 0.0
    nodes: set = field(default_factory=set)

    @property
    def name(self) -> str:
        return self.model.name

    def restrict(self, plan: EvalPlan) -> EvalPlan:
        return plan

    def run(self, plan: EvalPlan, pending, settings: EvalSettings):
        import ray

        options = self.options
        self.pending, self.already_done = len(pending), len(plan.samples) - len(pending)
        items = [
            {"index": index, "sample": pickle.dumps(sample, protocol=5), "existing": json.dumps(plan.existing(sample))}
            for index, sample in pending
        ]
        started = connect(options)
        start = time.perf_counter()
        try:
            if items:
                data = ray.data.from_items(items, override_num_blocks=len(items))
                data = data.map(load_stage, fn_kwargs={"window": settings.window}, num_cpus=1)
                data = data.map_batches(
                    self.stage,
                    fn_constructor_args=(self.model, settings, plan.methods, plan.settings_id, plan.unavailable),
                    batch_size=options.batch_size,
                    batch_format="numpy",
                    concurrency=options.workers,
                    num_cpus=1,
                    num_gpus=options.gpus_per_actor or None,
                    # as in the prune job: a killed actor is restarted and its batch retried
                    max_restarts=-1,
                    max_task_retries=-1,
                )
                for row in data.select_columns(["index", "records", "failure", "node"]).iter_rows():
                    self.nodes.add(row["node"])
                    if row["failure"]:
                        self.failed += 1
                        yield EngineEvent(failure=(int(row["index"]), json.loads(row["failure"])), finished=1)
                        continue
                    records = json.loads(row["records"])
                    self.written += len(records)
                    yield EngineEvent(records=records, finished=1)
        finally:
            if started:
                ray.shutdown()
            self.seconds = time.perf_counter() - start


def eval_job(dataset: Dataset, model: EvalModelRef, settings: EvalSettings, out_dir, *, options: RayOptions,
             html: bool = True, stage: type = EvalStage, shard_rows: int | None = None) -> dict:
    """Run (or resume) the eval into ``out_dir`` on Ray and return the summary (the single-process run's,
    written with its report); a line with counts and throughput goes to stderr. ``stage``: the actor
    class (a subclass may wrap :meth:`EvalStage.run_one`); ``shard_rows``: records per shard
    ``samples-<k>.jsonl`` (default: all in ``samples.jsonl``)."""
    out_dir = Path(out_dir)
    write = None
    if shard_rows is not None:
        shards: list[ShardWriter] = []

        def write(record: dict) -> None:
            # opened at the first record: after the plan has read (and repaired) the existing shards
            if not shards:
                shards.append(ShardWriter(out_dir, Path(RECORDS_NAME).stem, shard_rows))
            shards[0].write(json.dumps(record, allow_nan=False))

    engine = RayEvalEngine(model, options, stage)
    summary = drive_eval(dataset, engine, settings, out_dir, progress=False, html=html, write=write)
    ran = engine.pending - engine.failed
    print(
        f"medpruner eval (ray): {ran} sample(s) run, {engine.already_done} already done, "
        f"{engine.failed} failed, {engine.written} record(s) written in {engine.seconds:.1f} s "
        f"({ran / engine.seconds if engine.pending else 0:.2f} samples/s) on {len(engine.nodes)} node(s)",
        file=sys.stderr,
    )
    return summary
