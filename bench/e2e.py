"""End-to-end GPU benchmark: unpatched vs MedPruner paper mode vs fast mode on real-size models.

The models are built from the published configurations of Qwen3-VL-8B-Instruct and MedGemma-4B-it with
random bf16 weights (no checkpoint is needed: latency and memory depend on the shapes, not the values).
Each volume is a synthetic CT-like stack (``_common.drifting_volume``) fed the paper's way, one image per
slice, through the family's own image processor. Per (model, slice count, variant) the JSON records the
prefill latency (the forward that fills the KV cache, pruning and vision tower included), the time of the
pruning ops inside it, the decode throughput (each decode step after the prefill timed on its own; a time
that cannot be a rate is recorded as ``decode_error``, never as a number), the peak GPU memory and the
visual tokens that reach the language model. A configuration that
runs out of memory or past the model's context is recorded as such instead of stopping the run.

Row fields beyond the counts: ``prefill_ms`` (median), ``prefill_speedup`` (unpatched / this variant),
``prune_ms`` and ``prune_share`` (the pruning stage, vision tower included, and its share of the
prefill), ``prune_ops_ms`` and ``prune_ops_share`` (the medpruner_kernels ops alone, timed in one extra
forward, and their share of that forward), ``decode_tokens_per_s`` and ``decode_ms_per_token`` (one over
the median decode step, and that step) or ``decode_error``.

Random weights attend almost uniformly, so DINS keeps far more tokens at tau = 0.9 than with trained
weights (the paper reports a few percent): the rows record the retention reached, and a lower ``--tau`` (several may be
given) emulates a trained model's.

    python bench/e2e.py                       # both models, 64/256/600 slices, writes bench/results/e2e-*.json
    python bench/e2e.py --models qwen3_vl --slices 64 --decode-tokens 16
    python bench/e2e.py --smoke               # tiny models on CPU: checks the script, measures nothing useful

Nothing runs at import (pytest may collect this directory).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import gc
import importlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "python"))

RESULTS = Path(__file__).parent / "results"
VARIANTS = ("unpatched", "paper", "fast")

# Published configurations (config.json of the Hugging Face checkpoints), trimmed to the fields that
# differ from the transformers defaults.
QWEN3_VL_8B = dict(
    vision_config=dict(
        depth=27,
        hidden_size=1152,
        intermediate_size=4304,
        num_heads=16,
        patch_size=16,
        spatial_merge_size=2,
        temporal_patch_size=2,
        out_hidden_size=4096,
        num_position_embeddings=2304,
        deepstack_visual_indexes=[8, 16, 24],
        hidden_act="gelu_pytorch_tanh",
    ),
    text_config=dict(
        vocab_size=151936,
        hidden_size=4096,
        intermediate_size=12288,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=262144,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 5000000.0,
            "mrope_section": [24, 20, 20],
            "mrope_interleaved": True,
        },
        tie_word_embeddings=False,
    ),
    image_token_id=151655,
    video_token_id=151656,
    vision_start_token_id=151652,
    vision_end_token_id=151653,
)
MEDGEMMA_4B = dict(
    text_config=dict(
        vocab_size=262208,
        hidden_size=2560,
        intermediate_size=10240,
        num_hidden_layers=34,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=256,
        query_pre_attn_scalar=256,
        sliding_window=1024,
        max_position_embeddings=131072,
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        },
    ),
    vision_config=dict(
        hidden_size=1152,
        intermediate_size=4304,
        num_hidden_layers=27,
        num_attention_heads=16,
        image_size=896,
        patch_size=14,
        vision_use_head=False,
    ),
    mm_tokens_per_image=256,
    boi_token_index=255999,
    eoi_token_index=256000,
    image_token_index=262144,
)
# Text token ids used to build prompts without a tokenizer: any ids below the specials work.
QWEN_IDS = {"im_start": 151644, "im_end": 151645, "text": list(range(1000, 1016))}
GEMMA_IDS = {"bos": 2, "text": list(range(1000, 1016)), "newline": 108}


# ------------------------------------------------------------------------------------------- models
def build_model(family: str, device, dtype, *, tiny: bool = False):
    if family == "qwen3_vl":
        from transformers import Qwen3VLConfig as config_class
        from transformers import Qwen3VLForConditionalGeneration as model_class

        values = _tiny_qwen_config() if tiny else QWEN3_VL_8B
    elif family == "medgemma":
        from transformers import Gemma3Config as config_class
        from transformers import Gemma3ForConditionalGeneration as model_class

        values = _tiny_gemma_config() if tiny else MEDGEMMA_4B
    else:
        raise ValueError(f"family must be 'qwen3_vl' or 'medgemma', got {family!r}")
    config = config_class(**values)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = model_class._from_config(config, dtype=dtype).eval()
    if family == "medgemma":
        # The projector weight is initialised to zero: random values make the visual tokens matter.
        with torch.no_grad():
            model.model.multi_modal_projector.mm_input_projection_weight.normal_(0.0, 0.02)
    model.generation_config.do_sample = False
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def _tiny_qwen_config():
    values = json.loads(json.dumps(QWEN3_VL_8B))
    values["vision_config"].update(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        out_hidden_size=64,
        deepstack_visual_indexes=[0],
    )
    values["text_config"].update(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
    )
    values["text_config"]["rope_parameters"]["mrope_section"] = [4, 2, 2]
    return values


def _tiny_gemma_config():
    values = json.loads(json.dumps(MEDGEMMA_4B))
    values["vision_config"].update(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=64,
        patch_size=4,
    )
    values["text_config"].update(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=16,
    )
    values["mm_tokens_per_image"] = 16
    return values


# ------------------------------------------------------------------------------------------- inputs
def volume_slices(depth: int, size: int, seed: int = 0) -> list[np.ndarray]:
    """``depth`` RGB slices ``[size, size, 3]`` in [0, 1] of a drifting CT-like stack."""
    from _common import drifting_volume

    volume = ((drifting_volume(depth, size, size, seed=seed) + 1) / 2).clamp(0, 1)
    return [np.repeat(s.numpy()[:, :, None], 3, axis=2) for s in volume]


def build_inputs(family: str, model, depth: int, size: int, device) -> dict:
    """The request the family's processor would produce for ``depth`` slices + a short question, built
    from token ids (no tokenizer checkpoint exists offline) and the family's own image processor."""
    slices = volume_slices(depth, size)
    cfg = model.config
    question = [*range(1000, 1016)]
    if family == "qwen3_vl":
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        visual = model.model.visual
        factor = visual.patch_size * visual.spatial_merge_size
        pixels = (size // factor * factor) ** 2
        processor = Qwen2VLImageProcessorPil(
            patch_size=visual.patch_size,
            merge_size=visual.spatial_merge_size,
            temporal_patch_size=2,
            size={"shortest_edge": pixels, "longest_edge": pixels},
            image_mean=[0.5] * 3,
            image_std=[0.5] * 3,
        )
        images = processor(slices, do_rescale=False, return_tensors="pt")
        tokens = int(images["image_grid_thw"][0].prod()) // visual.spatial_merge_size**2
        ids = [QWEN_IDS["im_start"], *question[:4]]
        types = [0] * len(ids)
        for _ in range(depth):
            ids += [cfg.vision_start_token_id] + [cfg.image_token_id] * tokens + [cfg.vision_end_token_id]
            types += [0] + [1] * tokens + [0]
        tail = [*question, QWEN_IDS["im_end"], QWEN_IDS["im_start"], *question[:2]]
        ids += tail
        types += [0] * len(tail)
        request = {
            "pixel_values": images["pixel_values"],
            "image_grid_thw": images["image_grid_thw"],
            "mm_token_type_ids": torch.tensor([types]),
        }
    else:
        from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

        side = cfg.vision_config.image_size
        processor = Gemma3ImageProcessorPil(
            size={"height": side, "width": side},
            image_mean=[0.5] * 3,
            image_std=[0.5] * 3,
            do_pan_and_scan=False,
        )
        images = processor(slices, do_rescale=False, return_tensors="pt")
        tokens = cfg.mm_tokens_per_image
        ids = [GEMMA_IDS["bos"], *question[:4]]
        for i in range(depth):
            prefix = [1001, 1002, 1003 + i % 10, GEMMA_IDS["newline"], GEMMA_IDS["newline"]]
            ids += prefix + [cfg.boi_token_id] + [cfg.image_token_id] * tokens + [cfg.eoi_token_id]
        ids += question
        types = [1 if t == cfg.image_token_id else 0 for t in ids]
        request = {"pixel_values": images["pixel_values"], "token_type_ids": torch.tensor([types])}
    request["input_ids"] = torch.tensor([ids])
    request["attention_mask"] = torch.ones_like(request["input_ids"])
    dtype = model.dtype
    return {
        name: value.to(device, dtype) if value.is_floating_point() else value.to(device)
        for name, value in request.items()
    }


# ------------------------------------------------------------------------------------------ measure
# Sanity ceiling on a decode rate. A step multiplies by every language-model weight (but one row of the
# embedding table), and no memory system streams them faster than this (H200: 4.8 TB/s, B200: 8 TB/s).
PEAK_BANDWIDTH_BYTES_PER_S = 1e13
# A step runs every layer (tens of launches or loops); a microsecond per step is already impossible.
MAX_DECODE_TOKENS_PER_S = 1e6
# The public ops the adapters call; each outermost call is timed as pruning work.
PRUNING_OPS = (
    "iaf_select",
    "anchor_distances",
    "attention_importance",
    "nucleus_select",
    "nucleus_indices",
    "merge_tokens",
)


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device, repeats: int) -> float:
    """Median wall seconds of ``fn`` over ``repeats`` runs (after one warm-up)."""
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def decode_weight_bytes(model) -> int:
    """Bytes of the weights one decode step multiplies by: the language model without its input
    embedding table (a step gathers one row of it), plus the output projection (tied or not)."""
    language = model.get_decoder()
    weights = {id(p): p for p in language.parameters()}
    weights.pop(id(language.get_input_embeddings().weight), None)
    head = model.get_output_embeddings().weight
    weights[id(head)] = head
    return sum(p.numel() * p.element_size() for p in weights.values())


def decode_ceiling(model) -> float:
    """The highest decode rate (tokens/s) that can be true for ``model`` at batch 1."""
    return min(MAX_DECODE_TOKENS_PER_S, PEAK_BANDWIDTH_BYTES_PER_S / decode_weight_bytes(model))


def decode_rate(step_seconds, ceiling: float) -> dict:
    """The decode row fields from measured decode-step times: ``decode_tokens_per_s`` (one over the
    median step) and ``decode_ms_per_token``, or ``decode_error`` when the times cannot be a rate (no
    step, a step timed at or below zero or NaN, or a rate above ``ceiling``). An error is never a
    number."""
    steps = [float(s) for s in step_seconds]
    if not steps:
        return {"decode_error": "no decode step was timed (it needs at least 2 new tokens)"}
    bad = [s for s in steps if not s > 0.0]
    if bad:
        return {"decode_error": f"{len(bad)} of {len(steps)} decode steps timed non-positive or NaN ({bad[0]!r} s)"}
    step = float(np.median(steps))
    rate = 1.0 / step
    if not rate <= ceiling:
        return {
            "decode_error": f"implausible decode rate {rate:.3g} tokens/s (median step {step:.3g} s): "
            f"above the ceiling of {ceiling:.3g} tokens/s for this model"
        }
    return {"decode_tokens_per_s": rate, "decode_ms_per_token": 1e3 * step, "decode_steps_timed": len(steps)}


class StepClock:
    """A logits processor for ``generate`` that only takes the time. ``generate`` calls it once per new
    token, right after the forward that produced that token's logits (the first call follows the
    prefill), so consecutive stamps bracket exactly one decode step. It waits for the device first: the
    logits are ready only when that step's kernels have finished."""

    def __init__(self, device):
        self.device = device
        self.stamps: list[float] = []

    def __call__(self, input_ids, scores):
        _sync(self.device)
        self.stamps.append(time.perf_counter())
        return scores

    def step_seconds(self) -> list[float]:
        return [later - earlier for earlier, later in zip(self.stamps, self.stamps[1:])]


def measure_decode(model, inputs: dict, *, device, decode_tokens: int, repeats: int) -> dict:
    """Decode rate from the steps after the prefill, timed one by one (:class:`StepClock`) over
    ``repeats`` generations after a warm-up generation; see :func:`decode_rate`."""
    steps = []
    for run_index in range(1 + repeats):
        clock = StepClock(device)
        model.generate(**inputs, max_new_tokens=decode_tokens, min_new_tokens=decode_tokens, logits_processor=[clock])
        if run_index:
            steps += clock.step_seconds()
    return decode_rate(steps, decode_ceiling(model))


@contextlib.contextmanager
def pruning_op_time(device):
    """Time the public ``medpruner_kernels`` ops (:data:`PRUNING_OPS`) called inside the block. They are
    wrapped wherever the integration layer looks them up at call time (the package, its op modules and
    every loaded ``medpruner`` module that imported them by name); only the outermost call of a nest
    counts. On CUDA each call is bracketed by events on the current stream (no
    host sync in the forward, and the span includes the time the GPU waited for the op's launches); on
    CPU by the wall clock. Yields a dict that holds ``calls`` and ``ms`` once the block has exited."""
    import medpruner_kernels

    modules = [medpruner_kernels] + [
        importlib.import_module(f"medpruner_kernels.{name}") for name in ("iaf", "importance", "nucleus", "merge")
    ]
    cuda = torch.device(device).type == "cuda"
    spans, nesting = [], [0]

    def timed(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if nesting[0]:
                return fn(*args, **kwargs)
            nesting[0] += 1
            try:
                if cuda:
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    result = fn(*args, **kwargs)
                    end.record()
                    spans.append((start, end))
                else:
                    began = time.perf_counter()
                    result = fn(*args, **kwargs)
                    spans.append(time.perf_counter() - began)
            finally:
                nesting[0] -= 1
            return result

        return wrapper

    ops = {id(getattr(module, name)) for module in modules for name in PRUNING_OPS if hasattr(module, name)}
    # Modules of the integration layer that imported an op by name (`from medpruner_kernels import
    # iaf_select`, as the selectors do) hold their own binding: wrap it there too.
    modules += [
        module
        for module_name, module in list(sys.modules.items())
        if module is not None and (module_name == "medpruner" or module_name.startswith("medpruner."))
    ]
    originals = [
        (module, name, getattr(module, name))
        for module in modules
        for name in PRUNING_OPS
        if id(getattr(module, name, None)) in ops
    ]
    wrappers = {}
    for module, name, fn in originals:
        setattr(module, name, wrappers.setdefault(id(fn), timed(fn)))
    totals: dict = {}
    try:
        yield totals
    finally:
        for module, name, fn in originals:
            setattr(module, name, fn)
        _sync(device)
        totals["calls"] = len(spans)
        totals["ms"] = sum(start.elapsed_time(end) for start, end in spans) if cuda else 1e3 * sum(spans)


def measure(model, inputs: dict, variant: str, *, device, decode_tokens: int, repeats: int, gamma: float, tau: float):
    """One row of the table for ``variant`` ("unpatched" | "paper" | "fast"). ``decode_tokens=0`` times
    the prefill only."""
    from medpruner import apply_medpruner, remove_medpruner

    remove_medpruner(model)
    if variant != "unpatched":
        apply_medpruner(model, gamma=gamma, tau=tau, mode=variant)
    image_token = model.config.image_token_id
    row = {"variant": variant, "prompt_tokens": int(inputs["input_ids"].shape[1])}
    limit = model.config.get_text_config().max_position_embeddings
    if variant == "unpatched" and row["prompt_tokens"] + max(decode_tokens, 1) > limit:
        row["status"] = f"exceeds_context ({limit} positions)"
        return row
    decode, ops = {}, None
    try:
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        with torch.inference_mode():
            prefill = lambda: model(**inputs, use_cache=True, logits_to_keep=1)  # noqa: E731
            prefill_s = _timed(prefill, device, repeats)
            stats = None if variant == "unpatched" else model.medpruner_stats
            if variant != "unpatched":
                # A separate forward, so the wrappers cannot touch the timed prefills; the share is
                # taken within this forward, whose ops are part of it by construction.
                _sync(device)
                began = time.perf_counter()
                with pruning_op_time(device) as ops:
                    prefill()
                ops_forward_s = time.perf_counter() - began
            if decode_tokens:
                decode = measure_decode(
                    model, inputs, device=device, decode_tokens=decode_tokens, repeats=max(1, repeats // 2)
                )
    except torch.OutOfMemoryError:
        row["status"] = "oom"
        return row
    finally:
        remove_medpruner(model)
        gc.collect()
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
    visual_before = int((inputs["input_ids"] == image_token).sum())
    row.update(
        status="ok",
        prefill_ms=1e3 * prefill_s,
        **decode,
        peak_memory_gib=torch.cuda.max_memory_allocated() / 2**30 if torch.device(device).type == "cuda" else None,
        visual_tokens_before=visual_before,
        visual_tokens=stats.tokens_after if stats is not None else visual_before,
    )
    if stats is not None:
        row.update(
            slices_kept=sum(stats.slices_kept),
            slices_encoded=stats.slices_encoded,
            retention=stats.retention,
            # The whole pruning stage, vision tower included (PruneStats.prune_seconds).
            prune_ms=1e3 * stats.prune_seconds,
            prune_share=stats.prune_seconds / prefill_s,
        )
    if ops is not None:
        if ops["calls"]:
            row.update(
                prune_ops_ms=ops["ms"], prune_ops_calls=ops["calls"], prune_ops_share=1e-3 * ops["ms"] / ops_forward_s
            )
        else:
            row["prune_ops_error"] = "no medpruner_kernels op call was seen during the pruned prefill"
    return row


def iter_rows(
    models,
    slices,
    *,
    device,
    dtype,
    tiny: bool,
    decode_tokens: int,
    repeats: int,
    gamma: float,
    taus,
    qwen_size: int,
):
    """Yield one row per (model, slice count, variant) as soon as it is measured: unpatched once, then
    paper and fast at each tau of ``taus`` (the row carries its ``tau``). A pruned row whose unpatched
    row (same model and slices) succeeded carries ``prefill_speedup``."""
    for family in models:
        model = build_model(family, device, dtype, tiny=tiny)
        size = qwen_size if family == "qwen3_vl" else 256
        for depth in slices:
            inputs = build_inputs(family, model, depth, size, device)
            unpatched_ms = None
            pruned = [(variant, tau) for tau in taus for variant in VARIANTS if variant != "unpatched"]
            for variant, tau in [("unpatched", None), *pruned]:
                row = measure(
                    model,
                    inputs,
                    variant,
                    device=device,
                    decode_tokens=decode_tokens,
                    repeats=repeats,
                    gamma=gamma,
                    tau=tau,
                )
                row.update(model=family, slices=depth)
                if tau is not None:
                    row["tau"] = tau
                if row["status"] == "ok":
                    if variant == "unpatched":
                        unpatched_ms = row["prefill_ms"]
                    elif unpatched_ms is not None:
                        row["prefill_speedup"] = unpatched_ms / row["prefill_ms"]
                yield row
            del inputs
        del model
        gc.collect()
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()


def run(models, slices, **options) -> list[dict]:
    """:func:`iter_rows` collected, each row printed as a JSON line as it comes."""
    rows = []
    for row in iter_rows(models, slices, **options):
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main(argv=None) -> Path:
    """Run the table and write it to ``bench/results/e2e-<date>.json``; returns the path."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["qwen3_vl", "medgemma"], choices=["qwen3_vl", "medgemma"])
    parser.add_argument("--slices", nargs="+", type=int, default=[64, 256, 600])
    parser.add_argument("--qwen-size", type=int, default=384, help="Qwen slice side in pixels (fixed grid)")
    parser.add_argument(
        "--decode-tokens", type=int, default=32, help="new tokens per generation (>= 2: one decode step at least)"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gamma", type=float, default=0.05)
    parser.add_argument("--tau", nargs="+", type=float, default=[0.9], help="DINS tau of the pruned rows (each)")
    parser.add_argument("--smoke", action="store_true", help="tiny models on CPU, float32 (checks the script)")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.decode_tokens < 2:
        parser.error(f"--decode-tokens must be at least 2 (one comes from the prefill), got {args.decode_tokens}")
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    from _common import environment

    if args.smoke:
        device, dtype = "cpu", torch.float32
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench/e2e.py measures GPU latency and memory: no CUDA device (use --smoke to check it)")
        device, dtype = "cuda", torch.bfloat16
    rows = run(
        args.models,
        args.slices,
        device=device,
        dtype=dtype,
        tiny=args.smoke,
        decode_tokens=args.decode_tokens,
        repeats=args.repeats,
        gamma=args.gamma,
        taus=args.tau,
        qwen_size=args.qwen_size,
    )
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S")
    path = args.output or RESULTS / f"e2e-{'smoke-' if args.smoke else ''}{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "benchmark": "e2e",
        "environment": environment(),
        "arguments": vars(args) | {"output": str(path)},
        "rows": rows,
    }
    path.write_text(json.dumps(record, indent=2, default=str))
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
