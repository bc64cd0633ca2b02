"""``medpruner eval --engine vllm``: the eval's records from a vLLM engine serving the MedPruner plugin
(:mod:`medpruner.vllm`).

The plugin prunes to a fixed budget only, so two methods run here: ``none`` (the reference: per request
a negative gamma, which keeps every slice, and budget 1.0, which keeps every token: unpatched vLLM, as
tests/test_vllm.py's identity test checks) and ``medpruner_budget`` at the user's budget with the run's
gamma. The records, their keys, resume and the summary are :mod:`.runner`'s; ``settings_id`` covers the
engine, the budget and the model through the model name given to :func:`.runner.plan_eval`; the loop
is :func:`.runner.drive_eval`'s, over :class:`VllmEngine`.

Each request is one volume: the slices resized as the HF path resizes them
(:func:`medpruner.cli.models.model_slices`), as uint8 grey->RGB images, the prompt laid out as
:func:`medpruner.volume_to_inputs` lays it out, and the processor's pixel budget pinned to the slice's
own area (as ``volume_to_inputs`` pins it) so vLLM and HF give every slice the same grid. The pending
samples go to ``LLM.generate`` a chunk at a time (vLLM batches them); a chunk's records are written
when it finishes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from medpruner.config import MedPrunerConfig, budget_split
from medpruner.eval.readers import Dataset, DatasetError
from medpruner.eval.runner import (
    REFERENCE,
    EngineEvent,
    EvalPlan,
    EvalSettings,
    _Generation,
    _record,
    build_prompt,
    drive_eval,
    load_failure,
    record_key,
)

__all__ = ["METHODS", "VllmEngine", "VllmModel", "load_vllm_model", "run_vllm_eval", "vllm_model"]

BUDGETED = "medpruner_budget"
METHODS = (REFERENCE, BUDGETED)
# a negative gamma keeps every slice (IAF keeps d > gamma; gamma 0 would drop a slice that repeats its
# anchor exactly, as blank slices at a CT volume's ends do) and budget 1.0 keeps every token
REFERENCE_KNOBS = {"gamma": -1.0, "budget": 1.0}
CHUNK = 16
_BLOCK = ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>")


@dataclass
class VllmModel:
    """A vLLM ``LLM`` serving a checkpoint with the plugin. ``processor``: the checkpoint's HF processor
    (chat template; the HF-scale pixels that identify the kept slices); ``config``: the engine's
    MedPruner settings (its merge and context_frac apply to every request)."""

    llm: Any
    processor: Any
    family: str
    path: str
    config: MedPrunerConfig

    def name(self, budget) -> str:
        return f"vllm:{self.path}|budget={budget!r}"


def vllm_model(llm, path, config: MedPrunerConfig) -> VllmModel:
    """Wrap an engine already built with ``llm_kwargs(path, config=config)``."""
    from transformers import AutoProcessor

    from medpruner.vllm.engine import _family_of

    processor = AutoProcessor.from_pretrained(str(path), local_files_only=True)
    return VllmModel(llm, processor, _family_of(path), str(path), config)


def load_vllm_model(path, config: MedPrunerConfig, **engine) -> VllmModel:
    """Start an engine on ``path`` with the plugin (raw first-token logits for the audit); ``engine``:
    further ``LLM`` arguments (``max_model_len``, ...). ImportError when vLLM is not installed."""
    from vllm import LLM

    import medpruner.vllm as mv

    mv.register()
    llm = LLM(**mv.llm_kwargs(path, config=config), logprobs_mode="raw_logits", max_logprobs=-1, **engine)
    return vllm_model(llm, path, config)


@dataclass
class _Request:
    index: int
    sample: Any
    images: list
    text: str
    size: dict
    full: list[int]  # tokens of each slice before pruning
    expected: dict[str, list[int]]  # per method: slice_counts' kept tokens per slice on the HF-scale pixels


def _prepare(model: VllmModel, index, sample, volume, settings: EvalSettings, budget) -> _Request:
    import torch
    from PIL import Image

    from medpruner.adapters.qwen2_5_vl import Qwen25VLAdapter
    from medpruner.adapters.qwen3_vl import Qwen3VLAdapter
    from medpruner.cli.models import model_slices
    from medpruner.pipeline import _chat, volume_to_inputs
    from medpruner.vllm.engine import request_config
    from medpruner.vllm.processor import slice_counts

    image_processor = model.processor.image_processor
    merge = image_processor.merge_size
    slices = model_slices(volume, settings.resolution, image_processor.patch_size * merge)
    grey = (slices * 255.0).round().astype(np.uint8)
    images = [Image.fromarray(np.repeat(g[:, :, None], 3, axis=2)) for g in grey]
    prompt = build_prompt(sample)
    # the uint8 pixels vLLM receives, through the HF processor: the prompt's tokens and the pixels at the
    # scale gamma is defined on
    inputs = volume_to_inputs(model.processor, torch.from_numpy(grey / np.float32(255.0)), prompt,
                              family=model.family)
    grid = inputs["image_grid_thw"]
    full = (grid.prod(-1) // (merge * merge)).tolist()
    pixels = grid[0, 1].item() * grid[0, 2].item() * image_processor.patch_size ** 2
    # the slices IAF compares are on the checkpoint's own normalisation, as the plugin's processor has them
    adapter = (Qwen25VLAdapter(image_std=image_processor.image_std) if model.family == "qwen2_5_vl"
               else Qwen3VLAdapter())
    # the reference's knobs keep every slice and token: only the budgeted request needs IAF and the split
    config = request_config(model.config, _knobs(settings, budget)[BUDGETED])
    expected = {REFERENCE: list(full),
                BUDGETED: slice_counts(adapter, inputs["pixel_values"], grid, merge, config)[:, 0].tolist()}
    text = _chat(model.processor, "".join(_BLOCK) * len(images), prompt)
    return _Request(index, sample, images, text, {"shortest_edge": pixels, "longest_edge": pixels}, full, expected)


def _knobs(settings: EvalSettings, budget) -> dict[str, dict]:
    return {REFERENCE: dict(REFERENCE_KNOBS), BUDGETED: {"gamma": settings.gamma, "budget": budget}}


def _first_logits(completion):
    """The first generated token's raw logits (``logprobs=-1`` in raw_logits mode: every vocab entry)."""
    import torch

    step = completion.logprobs[0]
    ids = torch.tensor(list(step), dtype=torch.long)
    logits = torch.full((int(ids.max()) + 1,), float("-inf"))
    logits[ids] = torch.tensor([entry.logprob for entry in step.values()], dtype=logits.dtype)
    return logits


def _blocks(prompt_ids: list[int], start: int, pad: int, end: int) -> list[int]:
    """Placeholders of each slice block left in the prompt, in order (a dropped slice has no block)."""
    counts, inside = [], False
    for token in prompt_ids:
        if token == start:
            counts.append(0)
            inside = True
        elif token == end:
            inside = False
        elif inside and token == pad:
            counts[-1] += 1
    return counts


def _counts(blocks: list[int], full: list[int], expected: list[int]) -> dict:
    """The record's stage counts. Totals come from the request's own prompt (``blocks``): they are the
    tokens the model was given, exactly. Which slices were kept is not in the output (a dropped slice's
    block is removed); the plugin's ``slice_counts`` on the HF processor's pixels (``expected``) names
    them, accepted only when its kept slices give the very blocks of the output (else None: the float
    rounding of the two pixel paths moved a distance across gamma)."""
    kept = [i for i, count in enumerate(expected) if count > 0]
    named = [expected[i] for i in kept] == blocks
    total, tokens_kept = sum(full), sum(blocks)
    # every slice of a volume has one grid (the plugin refuses others), so the slice stage keeps
    # len(blocks) slices of full[0] tokens
    after = len(blocks) * full[0]
    return {
        "slices_total": len(full), "slices_kept": len(blocks), "kept_slices": kept if named else None,
        "tokens_total": total, "tokens_after_slice_stage": after, "tokens_kept": tokens_kept,
        "tokens_per_slice": list(expected) if named else None,
        "slice_stage_retention": after / total, "token_stage_retention": tokens_kept / after if after else 0.0,
        "retention": tokens_kept / total,
    }


@dataclass
class VllmEngine:
    """The eval engine over a vLLM ``LLM``: the pending samples a chunk at a time, each chunk's requests
    (every method of every sample, the reference always) in one ``LLM.generate``; a chunk's records are
    yielded when it finishes."""

    model: VllmModel
    budget: Any
    settings: EvalSettings
    chunk: int = CHUNK
    label: str = "medpruner eval (vllm)"

    def __post_init__(self) -> None:
        from vllm import SamplingParams

        self.params = SamplingParams(max_tokens=self.settings.max_new_tokens, temperature=0, logprobs=-1)

    @property
    def name(self) -> str:
        return self.model.name(self.budget)

    def restrict(self, plan: EvalPlan) -> EvalPlan:
        # plan_eval adds the adaptive medpruner (the budget source of the HF engine): not served
        methods = [m for m in plan.methods if m in METHODS]
        return replace(plan, methods=methods, added=[m for m in methods if m not in self.settings.methods])

    def run(self, plan: EvalPlan, pending, settings: EvalSettings):
        model, budget, methods, params = self.model, self.budget, plan.methods, self.params
        tokenizer = model.processor.tokenizer
        start, pad, end = tokenizer.convert_tokens_to_ids(list(_BLOCK))
        for first in range(0, len(pending), self.chunk):
            requests = []
            for index, sample in pending[first : first + self.chunk]:
                try:
                    volume = sample.load(settings.window)
                except DatasetError as err:
                    yield EngineEvent(failure=(index, load_failure(sample, err)))
                    continue
                requests.append(_prepare(model, index, sample, volume, settings, budget))
            # the reference always runs: its first-token logits are not stored
            jobs = [(r, m) for r in requests for m in methods
                    if m == REFERENCE or record_key(r.sample.sample_id, m, plan.settings_id) not in plan.done]
            prompts = [{"prompt": r.text, "multi_modal_data": {"image": r.images},
                        "mm_processor_kwargs": {**_knobs(settings, budget)[m], "size": r.size}} for r, m in jobs]
            began = time.perf_counter()
            outputs = model.llm.generate(prompts, params, use_tqdm=False) if prompts else []
            # batched: the chunk's wall time is shared evenly over its requests
            seconds = (time.perf_counter() - began) / max(len(jobs), 1)
            results = {}
            for (request, method), output in zip(jobs, outputs, strict=True):
                completion = output.outputs[0]
                text = tokenizer.decode(completion.token_ids, skip_special_tokens=True).strip()
                results[request.index, method] = (_Generation(text, _first_logits(completion), seconds),
                                                  _blocks(output.prompt_token_ids, start, pad, end))
            records = []
            for request in requests:
                reference = results[request.index, REFERENCE][0]
                for method in methods:
                    if record_key(request.sample.sample_id, method, plan.settings_id) in plan.done:
                        continue
                    generation, blocks = results[request.index, method]
                    counts = _counts(blocks, request.full, request.expected[method])
                    tokens = None
                    if method == BUDGETED:
                        tokens = sum(budget_split(budget, counts["slices_kept"], request.full[0]))
                    record = _record(request.sample, method, plan.settings_id, generation, reference, tokens,
                                     plan.unavailable, settings.metrics)
                    record.update(counts)
                    records.append(record)
            yield EngineEvent(records=records, finished=len(pending[first : first + self.chunk]))


def run_vllm_eval(dataset: Dataset, model: VllmModel, settings: EvalSettings, budget, out_dir, *,
                  chunk: int = CHUNK, progress: bool = True, html: bool = True) -> dict:
    """Run (or resume) ``settings.methods`` (a subset of :data:`METHODS`; ``none`` is added) at
    ``budget`` (a float in (0, 1] or an int of tokens per volume) into ``out_dir``; returns the summary
    (also written, with the report). ``settings.resolution`` is the slice side fed to the model."""
    from medpruner.vllm.engine import request_config

    other = [m for m in settings.methods if m not in METHODS]
    if other:
        raise ValueError(f"methods {other}: the vLLM engine runs {list(METHODS)} only (the HF engine runs the rest)")
    if settings.resolution is None:
        raise ValueError("settings.resolution: the vLLM engine needs the slice side")
    if (settings.merge, settings.context_frac) != (model.config.merge, model.config.context_frac):
        raise ValueError("settings: merge and context_frac must be the engine's (they are set when it starts)")
    request_config(model.config, {"gamma": settings.gamma, "budget": budget})
    engine = VllmEngine(model, budget, settings, chunk)
    return drive_eval(dataset, engine, settings, out_dir, progress=progress, html=html)
