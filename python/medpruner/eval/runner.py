"""The eval run: every sample of a dataset through a VLM, unpruned and under each selection method at
matched budgets, scored, audited and written out (JSONL per sample and method, a summary JSON, an HTML
report).

Per sample, in this order:

1. ``none``: the unpruned model (no patch at all); its answer and first-token logits are the reference
   of the audit and of the fidelity measures;
2. ``medpruner``: adaptive MedPruner (its kept visual-token count is the sample's budget);
3. every other method, the budgeted ones at that budget, each as a
   :class:`~medpruner.selectors.SelectorPolicy` that the model's own pipeline runs (its slice stage
   before the tower, its token stage after it; :func:`patch_with_policy`).

``none`` and ``medpruner`` are run whenever they are needed (the reference always; MedPruner when a
budgeted method is asked for) and the summary says which were added. Greedy decoding throughout.

Resume: a record's ``key`` is ``sample_id | method | settings_id`` (``settings_id`` hashes the model, the
prompt rule and every knob that changes an answer). A rerun with the same settings skips the samples
whose records are all there, redoes the reference of a half-done sample (deterministic, and its logits
are not stored) and appends the rest; records of other settings stay in the file and are left out of the
summary. A line cut short by an interruption is removed before appending. The Ray engine may write the
records to shards ``samples-<k>.jsonl`` next to ``samples.jsonl``; resume and summary read them all.

One driver (:func:`drive_eval`) plans, writes each record as it is made, counts the samples that fail to
load and writes the summary, whatever runs the samples: an :class:`EvalEngine` (:class:`HFEngine` here,
``VllmEngine`` in :mod:`.vllm_engine`, ``RayEvalEngine`` in :mod:`medpruner.distributed.eval_job`).
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, closing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from medpruner.eval import audit
from medpruner.eval.metrics import normalize_answer, optional_metrics, score_answer
from medpruner.eval.readers import Dataset, DatasetError, Sample
from medpruner.eval.summary import REFERENCE, summarize_records

__all__ = [
    "RECORDS_NAME",
    "SUMMARY_NAME",
    "EngineEvent",
    "EvalEngine",
    "EvalModel",
    "EvalPlan",
    "EvalSettings",
    "HFEngine",
    "append_record",
    "build_prompt",
    "drive_eval",
    "eval_sample",
    "finish_eval",
    "load_failure",
    "patch_with_policy",
    "plan_eval",
    "read_records",
    "record_key",
    "record_files",
    "resolve_methods",
    "run_eval",
]

RECORDS_NAME = "samples.jsonl"
SUMMARY_NAME = "summary.json"
BUDGET_SOURCE = "medpruner"
# Bumped when the prompt or the record fields change meaning: old records are then not reused.
PROMPT_VERSION = 2


@dataclass
class EvalModel:
    """A loaded VLM for the eval. ``make_inputs(volume [D, H, W] in [0, 1], prompt)`` returns the
    processor inputs on the model's device (one image per slice, the resolution chosen by the caller)."""

    model: Any
    processor: Any
    name: str
    make_inputs: Callable[[np.ndarray, str], Any]

    @property
    def tokenizer(self):
        return getattr(self.processor, "tokenizer", self.processor)


@dataclass
class EvalSettings:
    """The knobs of a run. ``methods``: selector names (see :func:`resolve_methods`); gamma, tau, merge,
    context_frac: MedPruner's (DESIGN.md defaults), gamma_local the local-change IAF's threshold, passed
    to every selector that takes them; backend:
    kernel backend; max_new_tokens: greedy answer length; seed: the random selector's seed (per sample
    ``seed + index``); window: CT window for volumes in Hounsfield units; resolution: the slice size the
    caller resized to (recorded only); limit: the first N samples; bootstrap: resamples of the
    confidence intervals; metrics: "default" or "paper" (the published evaluation's report metrics for
    open answers, see :func:`medpruner.eval.metrics.score_answer`); allow_other_settings: run in a
    folder that holds records of other settings (refused otherwise: the summary and report would
    describe this run while the folder mixes runs)."""

    methods: tuple[str, ...]
    gamma: float = 0.05
    gamma_local: float = 0.1
    tau: float = 0.9
    merge: bool = True
    context_frac: float = 0.05
    backend: str = "auto"
    max_new_tokens: int = 8
    seed: int = 0
    window: str = "auto"
    resolution: int | None = None
    limit: int | None = None
    bootstrap: int = 1000
    metrics: str = "default"
    allow_other_settings: bool = False

    def selector_settings(self) -> dict[str, Any]:
        return {"gamma": self.gamma, "gamma_local": self.gamma_local, "tau": self.tau, "merge": self.merge,
                "context_frac": self.context_frac}

    def settings_id(self, model_name: str) -> str:
        """A short hash of everything that changes a record's content (not ``methods``, ``limit`` or
        ``bootstrap``, which only choose what is run or summarised)."""
        fields = {k: v for k, v in asdict(self).items() if k not in _NOT_CONTENT}
        text = json.dumps({"model": model_name, "prompt": PROMPT_VERSION, **fields}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def resolve_methods(methods: Sequence[str]) -> tuple[list[str], list[str]]:
    """(methods in run order, methods added): the reference ``none`` first, ``medpruner`` next when any
    budgeted method is asked for, then the rest in the order given (duplicates dropped). ValueError
    naming an unknown method."""
    from medpruner.selectors import get_selector

    asked = list(dict.fromkeys(methods))
    if not asked:
        raise ValueError("methods: give at least one method")
    specs = {name: get_selector(name) for name in asked}
    needed = [REFERENCE]
    if BUDGET_SOURCE in asked or any(spec.budgeted for spec in specs.values()):
        needed.append(BUDGET_SOURCE)
    added = [name for name in needed if name not in asked]
    return needed + [name for name in asked if name not in needed], added


_OPTION_LINE = re.compile(r"^\s*\(?([A-H])[.):]\s*\S")
_INSTRUCTION_LINE = re.compile(r"^\s*answer with\b", re.IGNORECASE)


def build_prompt(sample: Sample) -> str:
    """The question, then (closed) the options as "A. text" lines unless the question already lists
    them, and an instruction to answer with the letter unless the question already ends with an
    "Answer with ..." line (a dataset written in its model's own prompt format, as the synthetic task's)."""
    if not sample.closed:
        return sample.question
    lines = [sample.question]
    question_lines = sample.question.splitlines()
    listed = {m.group(1) for m in map(_OPTION_LINE.match, question_lines) if m}
    if sample.options and not set(sample.options) <= listed:
        lines += [f"{letter}. {text}" for letter, text in sample.options.items()]
    elif question_lines and _INSTRUCTION_LINE.match(question_lines[-1]):
        return sample.question
    lines.append("Answer with the option's letter.")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ records
def read_records(path: Path) -> list[dict]:
    """The records of a JSONL file; a last line cut short by an interruption is cut off the file."""
    if not path.exists():
        return []
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        data = data[: data.rfind(b"\n") + 1]
        with open(path, "r+b") as handle:
            handle.truncate(len(data))
    records = []
    for number, line in enumerate(data.decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{path}: line {number} is not valid JSON ({err}); move the file away to start over"
            ) from err
    return records


_SHARD = re.compile(r"^samples-(\d+)\.jsonl$")


def record_files(out_dir) -> list[Path]:
    """The run's records files in reading order: ``samples.jsonl`` (when there), then its shards
    ``samples-<k>.jsonl`` by ``k``."""
    out_dir = Path(out_dir)
    shards = sorted((int(m.group(1)), path) for path in out_dir.glob("samples-*.jsonl")
                    if (m := _SHARD.match(path.name)))
    base = out_dir / RECORDS_NAME
    return ([base] if base.exists() else []) + [path for _, path in shards]


def record_key(sample_id: str, method: str, settings_id: str) -> str:
    """A record's resume key."""
    return f"{sample_id}|{method}|{settings_id}"


def append_record(handle, record: dict) -> None:
    """One record as one JSON line, flushed (an interruption cuts at most the last line)."""
    handle.write(json.dumps(record, allow_nan=False) + "\n")
    handle.flush()


@dataclass
class _Generation:
    prediction: str
    first_logits: Any
    seconds: float
    stats: Any = None
    selections: list = field(default_factory=list)
    timing: dict | None = None


def _generate(eval_model: EvalModel, inputs, max_new_tokens: int) -> _Generation:
    import torch

    from medpruner.eval.cost import PrefillTimer, tower_module

    timer = PrefillTimer(tower_module(eval_model.model))
    try:
        start = time.perf_counter()
        timer.start()
        with torch.inference_mode():
            output = eval_model.model.generate(
                **inputs, max_new_tokens=max_new_tokens, do_sample=False, output_logits=True,
                return_dict_in_generate=True, streamer=timer,
            )
        seconds = time.perf_counter() - start
    finally:
        timer.close()
    new_tokens = output.sequences[0, inputs["input_ids"].shape[1]:]
    text = eval_model.tokenizer.decode(new_tokens, skip_special_tokens=True).strip()
    return _Generation(text, output.logits[0][0].detach().float().cpu(), seconds,
                       timing=timer.split())


def patch_with_policy(model, policy, config):
    """Patch ``model`` (``forward`` and ``generate``) to prune with ``policy``'s two stages in the
    pipeline (``config``: its backend, importance layer and temperature); undo with
    ``medpruner.remove_medpruner(model)``. Returns the adapter."""
    from medpruner.adapters import adapter_for, unpatch

    adapter = adapter_for(model)
    adapter.policy = policy
    adapter.check_config(model, config)
    unpatch(model)
    adapter.patch(model, config)
    return adapter


def _run_method(eval_model: EvalModel, inputs, method: str, settings: EvalSettings, budget, seed: int) -> _Generation:
    from medpruner import MedPrunerConfig, remove_medpruner
    from medpruner.selectors import SelectorPolicy

    model = eval_model.model
    if method == REFERENCE:
        return _generate(eval_model, inputs, settings.max_new_tokens)
    config = MedPrunerConfig(gamma=settings.gamma, tau=settings.tau, merge=settings.merge,
                             context_frac=settings.context_frac, backend=settings.backend)
    policy = SelectorPolicy(method, budgets=None if budget is None else [budget],
                            settings=settings.selector_settings(), seed=seed)
    # the tower encodes the kept slices only, once: the measured tower time is the deployed one
    patch_with_policy(model, policy, config)
    try:
        result = _generate(eval_model, inputs, settings.max_new_tokens)
        result.stats, result.selections = model.medpruner_stats, list(policy.selections)
    finally:
        remove_medpruner(model)
    return result


def _record(sample: Sample, method: str, settings_id: str, generation: _Generation, reference: _Generation,
            budget, unavailable: dict, metric_set: str = "default") -> dict:
    metrics = score_answer(generation.prediction, answer=sample.answer, options=sample.options,
                           answer_letter=sample.answer_letter, meteor_available=unavailable.get("meteor") is None,
                           metric_set=metric_set, report=sample.report)
    if generation.selections:
        stages = generation.selections[0].stages
        kept_slices = generation.selections[0].kept_slices
    else:
        # the unpruned reference: _reference_record fills in the counts
        stages = {"slice_stage_retention": 1.0, "token_stage_retention": 1.0, "retention": 1.0}
        kept_slices = None
    kl = audit.first_token_kl(reference.first_logits, generation.first_logits)
    return {
        "key": record_key(sample.sample_id, method, settings_id),
        "settings_id": settings_id,
        "sample_id": sample.sample_id,
        "method": method,
        "category": sample.category,
        "closed": sample.closed,
        "report": sample.report,
        "question": sample.question,
        "answer": sample.answer,
        "answer_letter": sample.answer_letter,
        "prediction": generation.prediction,
        "metrics": metrics,
        "correct": metrics.get("accuracy"),
        "budget": budget,
        "kept_slices": kept_slices,
        **stages,
        "tokens_per_slice": None if generation.stats is None else list(generation.stats.tokens_per_slice[0]),
        "answer_agreement": normalize_answer(generation.prediction) == normalize_answer(reference.prediction),
        "first_token_kl": kl,
        "top1": int(generation.first_logits.argmax()),
        "reference_top1": int(reference.first_logits.argmax()),
        "seconds": generation.seconds,
    }


def add_cost(record: dict, model, volume_shape, text_tokens: int, timing: dict | None) -> None:
    """A record's cost fields: slices through the tower as the method would run deployed (a slice-stage
    method encodes only its kept slices), the LLM tokens, the measured seconds (``seconds_split``: tower,
    pruning, LLM prefill; None where not measured), the modelled prefill of the published
    configurations at this volume's size (``modelled``) and the model's own modelled FLOPs
    (``modelled_flops``, for :func:`medpruner.eval.summary.cost_check`)."""
    from medpruner.eval.cost import ModelShape, published_costs
    from medpruner.selectors import get_selector

    record["slices_encoded"] = record["slices_kept"] if get_selector(record["method"]).slice_stage \
        else record["slices_total"]
    record["text_tokens"] = text_tokens
    record["volume_shape"] = [int(v) for v in volume_shape]
    record["seconds_split"] = timing
    record["modelled"] = published_costs(record, volume_shape, text_tokens)
    try:
        shape = ModelShape.from_config(model.config)
    except (ValueError, AttributeError, TypeError):
        record["modelled_flops"] = None
        return
    per_slice = record["tokens_total"] // max(record["slices_total"], 1) * shape.merge**2
    dropped = record["slices_total"] - record["slices_kept"]
    llm_tokens = text_tokens - shape.wrapper_tokens * dropped + record["tokens_kept"]
    record["modelled_flops"] = record["slices_encoded"] * shape.tower_flops(per_slice) + shape.prefill_flops(llm_tokens)


def _reference_record(sample, settings_id, reference, layout, unavailable, metric_set) -> dict:
    record = _record(sample, REFERENCE, settings_id, reference, reference, None, unavailable, metric_set)
    tokens = int(layout.token_offsets[-1])
    record.update(slices_total=layout.num_images, slices_kept=layout.num_images,
                  kept_slices=list(range(layout.num_images)), tokens_total=tokens, tokens_after_slice_stage=tokens,
                  tokens_kept=tokens, tokens_per_slice=list(layout.tokens))
    return record


# ------------------------------------------------------------------------------------------- the run
@dataclass
class EvalPlan:
    """What a run (or a resumed one) does, worked out before any model runs: the methods in run order,
    the records file and its records of these settings by key, the samples, and the optional metrics
    that cannot be computed. Shared by :func:`run_eval` and the Ray engine
    (:mod:`medpruner.distributed.eval_job`)."""

    methods: list[str]
    added: list[str]
    settings_id: str
    records_path: Path
    done: dict[str, dict]
    samples: list[Sample]
    unavailable: dict

    def keys(self, sample: Sample) -> dict[str, str]:
        return {m: record_key(sample.sample_id, m, self.settings_id) for m in self.methods}

    def pending(self) -> list[tuple[int, Sample]]:
        """(index, sample) of the samples that miss a record; the index seeds the random selector."""
        return [(index, sample) for index, sample in enumerate(self.samples)
                if any(key not in self.done for key in self.keys(sample).values())]

    def existing(self, sample: Sample) -> dict[str, dict]:
        """The sample's records already in the file, by key."""
        return {key: self.done[key] for key in self.keys(sample).values() if key in self.done}


_NOT_CONTENT = ("methods", "limit", "bootstrap", "allow_other_settings")
SETTINGS_NAME = "settings.json"


def _guard_settings(out_dir: Path, records: list[dict], settings_id: str, settings: EvalSettings,
                    model_name: str) -> None:
    """Refuse a folder holding records of other settings unless ``settings.allow_other_settings``;
    remember this run's settings (by id) in ``settings.json`` to name what differs next time."""
    from medpruner.report import atomic_write_text

    path = out_dir / SETTINGS_NAME
    known = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    mine = {"model": model_name, **{k: v for k, v in asdict(settings).items() if k not in _NOT_CONTENT}}
    others = sorted({r.get("settings_id") for r in records} - {settings_id, None})
    if others and not settings.allow_other_settings:
        differences = []
        for other in others[:3]:
            theirs = known.get(other)
            changed = ("unknown settings" if theirs is None else
                       ", ".join(f"{k} {theirs.get(k)!r} -> {v!r}" for k, v in mine.items() if theirs.get(k) != v))
            differences.append(f"{other}: {changed}")
        raise ValueError(f"{out_dir} holds records of other settings ({'; '.join(differences)}); give another --out, "
                         "or --allow-other-settings to add this run beside them (the summary and report then cover "
                         "this run only)")
    if known.get(settings_id) != mine:
        atomic_write_text(path, json.dumps({**known, settings_id: mine}, indent=1, sort_keys=True) + "\n")


def plan_eval(dataset: Dataset, model_name: str, settings: EvalSettings, out_dir) -> EvalPlan:
    """Check the dataset and the methods, create ``out_dir`` and read its records of these settings."""
    methods, added = resolve_methods(settings.methods)
    ids = [s.sample_id for s in dataset.samples]
    duplicates = sorted(i for i, count in Counter(ids).items() if count > 1)
    if duplicates:
        raise ValueError(f"{dataset.file}: sample ids must be unique, repeated: {duplicates[:5]}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records_path = out_dir / RECORDS_NAME
    settings_id = settings.settings_id(model_name)
    records = [r for path in record_files(out_dir) for r in read_records(path)]
    _guard_settings(out_dir, records, settings_id, settings, model_name)
    done = {r["key"]: r for r in records if r.get("settings_id") == settings_id}
    samples = dataset.samples if settings.limit is None else dataset.samples[: settings.limit]
    return EvalPlan(methods, added, settings_id, records_path, done, samples, optional_metrics())


def load_failure(sample: Sample, err: DatasetError) -> dict:
    """The summary's entry for a sample whose volume cannot be loaded."""
    return {"sample_id": sample.sample_id, "source": sample.source, "reason": str(err)}


def eval_sample(eval_model: EvalModel, sample: Sample, index: int, volume: np.ndarray, methods: Sequence[str],
                settings: EvalSettings, settings_id: str, existing: dict[str, dict],
                unavailable: dict) -> Iterator[dict]:
    """The missing records of one loaded sample, yielded in run order as each is made (the caller
    writes each before the next method runs); ``existing``: its records already made, by key. The
    reference runs every time (its logits are not stored); ``index`` seeds the random selector
    (``settings.seed + index``)."""
    from medpruner.adapters import adapter_for

    existing = dict(existing)
    keys = {m: record_key(sample.sample_id, m, settings_id) for m in methods}
    inputs = eval_model.make_inputs(volume, build_prompt(sample))
    layout = adapter_for(eval_model.model).layout(eval_model.model, dict(inputs))
    text_tokens = int(inputs["input_ids"].shape[1]) - int(layout.token_offsets[-1])
    reference = _run_method(eval_model, inputs, REFERENCE, settings, None, settings.seed + index)
    for method in methods:
        if keys[method] in existing:
            continue
        if method == REFERENCE:
            record = _reference_record(sample, settings_id, reference, layout, unavailable, settings.metrics)
            generation = reference
        else:
            # medpruner runs before every budgeted method, so its record is there by now
            budget = existing[keys[BUDGET_SOURCE]]["tokens_kept"] if _budgeted(method) else None
            generation = _run_method(eval_model, inputs, method, settings, budget, settings.seed + index)
            record = _record(sample, method, settings_id, generation, reference, budget, unavailable,
                             settings.metrics)
        add_cost(record, eval_model.model, volume.shape, text_tokens, generation.timing)
        existing[record["key"]] = record
        yield record


def finish_eval(plan: EvalPlan, dataset: Dataset, model_name: str, settings: EvalSettings, out_dir,
                failed: list[dict], *, html: bool = True) -> dict:
    """The summary of the plan's samples over the records in ``plan.done``, written with the report."""
    from medpruner.eval.cost_report import cost_table, plot_cost
    from medpruner.eval.report import write_report

    records = [plan.done[key] for s in plan.samples for key in plan.keys(s).values() if key in plan.done]
    summary = summarize_records(records, plan.methods, bootstrap=settings.bootstrap, unavailable=plan.unavailable)
    summary.update(
        dataset=dataset.summary(),
        model=model_name,
        settings={**asdict(settings), "methods": list(settings.methods)},
        settings_id=plan.settings_id,
        methods_run=plan.methods,
        methods_added=plan.added,
        failed_samples=failed,
        files={"records": RECORDS_NAME, "record_shards": [p.name for p in record_files(out_dir)
                                                          if p.name != RECORDS_NAME],
               "summary": SUMMARY_NAME, "report": "report.html" if html else None},
    )
    cost_plot = plot_cost(summary, out_dir) if html else None
    summary["files"]["cost_plot"] = None if cost_plot is None else cost_plot.name
    summary["pareto_cost"] = {row["method"]: {"modelled": row["pareto_modelled"], "measured": row["pareto_measured"]}
                              for row in cost_table(summary)}
    write_report(Path(out_dir), summary, html=html)
    return summary


# ------------------------------------------------------------------------------------ engines, driver
@dataclass
class EngineEvent:
    """What an engine reports while it runs the pending samples: records to write, in the order made; a
    sample's load failure as (its index, :func:`load_failure`); samples finished (the progress)."""

    records: list[dict] = field(default_factory=list)
    failure: tuple[int, dict] | None = None
    finished: int = 0


class EvalEngine(Protocol):
    """What runs the samples of a plan. ``name``: the model name the records are keyed by (part of
    ``settings_id``); ``label``: the progress bar's; :meth:`restrict`: the plan narrowed to the methods
    the engine runs; :meth:`run`: the events of the ``pending`` samples ((index, sample), dataset order;
    the index seeds the random selector), each record yielded once made."""

    name: str
    label: str

    def restrict(self, plan: EvalPlan) -> EvalPlan: ...

    def run(self, plan: EvalPlan, pending: list[tuple[int, Sample]], settings: EvalSettings) -> Iterator[EngineEvent]:
        ...


@dataclass
class HFEngine:
    """The Hugging Face model in this process, one sample after the other (:func:`eval_sample`)."""

    model: EvalModel
    label: str = "medpruner eval"

    @property
    def name(self) -> str:
        return self.model.name

    def restrict(self, plan: EvalPlan) -> EvalPlan:
        return plan

    def run(self, plan: EvalPlan, pending, settings: EvalSettings) -> Iterator[EngineEvent]:
        for index, sample in pending:
            try:
                volume = sample.load(settings.window)
            except DatasetError as err:
                yield EngineEvent(failure=(index, load_failure(sample, err)), finished=1)
                continue
            for record in eval_sample(self.model, sample, index, volume, plan.methods, settings, plan.settings_id,
                                      plan.existing(sample), plan.unavailable):
                yield EngineEvent(records=[record])
            yield EngineEvent(finished=1)


def drive_eval(dataset: Dataset, engine: EvalEngine, settings: EvalSettings, out_dir, *, progress: bool = True,
               html: bool = True, write: Callable[[dict], None] | None = None) -> dict:
    """Run (or resume) the eval into ``out_dir`` with ``engine`` and return the summary (also written to
    ``summary.json``; ``report.html`` and the plots with ``html``). Each record is written as it arrives:
    appended to ``samples.jsonl``, or given to ``write`` (the Ray engine's shards)."""
    from tqdm.auto import tqdm

    plan = engine.restrict(plan_eval(dataset, engine.name, settings, out_dir))
    pending = plan.pending()
    failed: list[tuple[int, dict]] = []
    with ExitStack() as stack:
        if write is None:
            handle = stack.enter_context(open(plan.records_path, "a", encoding="utf-8"))

            def write(record: dict) -> None:
                append_record(handle, record)

        bar = stack.enter_context(tqdm(total=len(pending), disable=not progress, unit="sample", desc=engine.label))
        for event in stack.enter_context(closing(engine.run(plan, pending, settings))):
            for record in event.records:
                plan.done[record["key"]] = record
                write(record)
            if event.failure is not None:
                failed.append(event.failure)
            bar.update(event.finished)
    failures = [failure for _, failure in sorted(failed, key=lambda item: item[0])]
    return finish_eval(plan, dataset, engine.name, settings, Path(out_dir), failures, html=html)


def run_eval(dataset: Dataset, eval_model: EvalModel, settings: EvalSettings, out_dir, *, progress: bool = True,
             html: bool = True) -> dict:
    """Run (or resume) the eval into ``out_dir`` with the HF model in this process and return the
    summary (also written to ``summary.json``; ``report.html`` and the plots with ``html``)."""
    return drive_eval(dataset, HFEngine(eval_model), settings, out_dir, progress=progress, html=html)


def _budgeted(method: str) -> bool:
    from medpruner.selectors import get_selector

    return get_selector(method).budgeted
