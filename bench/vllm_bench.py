"""vLLM with and without the MedPruner plugin under load: TTFT and requests/s at several concurrencies,
one run, the same volumes, on an engine serving a stream of requests.

    python bench/vllm_bench.py                      # tiny random Qwen3-VL on CPU (~12 min on 2 cores)
    python bench/vllm_bench.py --model /ckpt/Qwen3-VL-8B-Instruct --slices 64 --size 384   # a real checkpoint, GPU

Online serving, as ``vllm serve`` runs it: an ``AsyncLLM`` engine (the engine core in its own process,
the multimodal processor, where IAF runs, in this one), and at concurrency ``c`` the load is ``c``
clients that each send a request as soon as their previous one finished (closed loop, as ``vllm bench
serve --max-concurrency``), so requests arrive while others prefill and decode. Each level sends
``max(--min-requests, --rounds * c)`` requests after ``c`` warm-up requests at that level. Both variants
serve the same checkpoint, one engine at a time, taking turns for ``--passes`` passes (vLLM, plugin,
plugin, vLLM, ...: a shared machine's load drifts), upstream vLLM and ``medpruner.vllm`` with
``--budget``/``--gamma``, on the same synthetic CT-like volumes: one volume per request, one image per
slice, each request its own volume (seeded), with prefix caching and the multimodal processor cache off,
so every request runs the processor, the vision tower and the prefill.

Per (variant, concurrency), the median over passes (each pass is kept in ``passes``): ``ttft_s`` (the
first token's arrival minus the request's submission, queueing included; median, p90, mean),
``requests_per_s`` and ``output_tokens_per_s`` (completed requests and tokens over the level's wall
time, each request decoding exactly ``--tokens`` tokens, EOS ignored), the median end-to-end latency and
the prompt length vLLM saw (the pruned length with the plugin). ``ratios``: plugin over baseline per
concurrency (requests/s above 1 and TTFT below 1 are wins). Writes
``bench/results/vllm-serving-<device>-<date>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import gc
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
RESULTS = Path(__file__).parent / "results"
CONCURRENCY = (1, 4, 16, 64)


def tiny_checkpoint(path: Path) -> Path:
    """A tiny random Qwen3-VL (text head dim 32, which the CPU attention backend accepts) and its
    processor, saved to ``path``."""
    from medpruner import _tiny
    from transformers import Qwen3VLForConditionalGeneration, Qwen3VLProcessor
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    tokenizer = _tiny.qwen_tokenizer()
    config = _tiny.tiny_qwen3_vl_config(tokenizer, head_dim=32)
    torch.manual_seed(0)
    model = Qwen3VLForConditionalGeneration(config).eval()
    size = {"shortest_edge": 256, "longest_edge": 256 * 1024}
    processor = Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(
            patch_size=8, merge_size=2, temporal_patch_size=2, size=size, image_mean=[0.5] * 3, image_std=[0.5] * 3
        ),
        tokenizer=tokenizer,
        video_processor=Qwen3VLVideoProcessor(patch_size=8, merge_size=2, temporal_patch_size=2),
    )
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def volume_images(depth: int, size: int, seed: int):
    """``depth`` RGB PIL slices of a drifting CT-like volume (``_common.drifting_volume``)."""
    from _common import drifting_volume
    from PIL import Image

    volume = drifting_volume(depth, size, size, torch.uint8, seed=seed).numpy().astype(np.uint8)
    return [Image.fromarray(np.repeat(s[:, :, None], 3, axis=2)) for s in volume]


def prompt(depth: int) -> str:
    return (
        "<|im_start|>user\n"
        + "<|vision_start|><|image_pad|><|vision_end|>" * depth
        + "Describe the findings.<|im_end|>\n<|im_start|>assistant\n"
    )


def tokens_per_slice(model: Path, size: int) -> int:
    with open(model / "config.json", encoding="utf-8") as handle:
        vision = json.load(handle)["vision_config"]
    side = size // (vision["patch_size"] * vision["spatial_merge_size"])
    return side * side


def engine_args(args, plugin: bool):
    import medpruner.vllm as mv
    from vllm import AsyncEngineArgs

    longest = args.slices * tokens_per_slice(args.model, args.size)
    kwargs = {"model": str(args.model)}
    if plugin:
        mv.register()
        kwargs = mv.llm_kwargs(args.model, budget=args.budget, gamma=args.gamma)
    kwargs.update(
        max_model_len=longest + 512,
        limit_mm_per_prompt={"image": args.slices},
        enable_prefix_caching=False,
        mm_processor_cache_gb=0,
        max_num_seqs=max(args.concurrency),
        seed=0,
        disable_log_stats=True,
    )
    if args.device == "cpu":
        kwargs.update(dtype="float32", enforce_eager=True, max_num_batched_tokens=args.max_num_batched_tokens
                      or kwargs["max_model_len"])
    else:
        kwargs.update(dtype="bfloat16", gpu_memory_utilization=args.gpu_memory_utilization)
        if args.max_num_batched_tokens:
            kwargs["max_num_batched_tokens"] = args.max_num_batched_tokens
        if args.enforce_eager:
            kwargs["enforce_eager"] = True
    return AsyncEngineArgs(**kwargs)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


async def serve_level(engine, args, concurrency: int, requests: list[dict], tag: str) -> dict:
    """``requests`` sent by ``concurrency`` closed-loop clients; the first ``concurrency`` are the level's
    warm-up (sent the same way, not measured)."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=args.tokens, temperature=0, ignore_eos=True)
    records: list[dict] = []

    async def one(index: int, request: dict) -> dict:
        submitted = time.perf_counter()
        first = None
        final = None
        async for output in engine.generate(request, params, request_id=f"{tag}-c{concurrency}-{index}"):
            if first is None and output.outputs and output.outputs[0].token_ids:
                first = time.perf_counter()
            final = output
        done = time.perf_counter()
        if final is None or len(final.outputs[0].token_ids) != args.tokens:
            raise RuntimeError("a request stopped before --tokens tokens although EOS is ignored")
        return {"ttft_s": first - submitted, "latency_s": done - submitted, "done": done,
                "prompt_tokens": len(final.prompt_token_ids)}

    async def run(batch: list[dict]) -> tuple[float, list[dict]]:
        pending = iter(enumerate(batch))
        out: list[dict] = []

        async def client():
            for index, request in pending:
                out.append(await one(index, request))

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        return time.perf_counter() - start, out

    await run(requests[:concurrency])
    wall, records = await run(requests[concurrency:])
    ttft = [r["ttft_s"] for r in records]
    return {
        "concurrency": concurrency,
        "requests": len(records),
        "wall_s": wall,
        "requests_per_s": len(records) / wall,
        "output_tokens_per_s": len(records) * args.tokens / wall,
        "ttft_s": statistics.median(ttft),
        "ttft_s_p90": percentile(ttft, 90),
        "ttft_s_mean": statistics.fmean(ttft),
        "latency_s": statistics.median(r["latency_s"] for r in records),
        "prompt_tokens": statistics.median(r["prompt_tokens"] for r in records),
    }


def level_requests(args, concurrency: int) -> list[dict]:
    """Warm-up plus measured requests of one level; the same seeds for both variants."""
    count = concurrency + max(args.min_requests, args.rounds * concurrency)
    base = 100_000 * concurrency
    text = prompt(args.slices)
    return [{"prompt": text, "multi_modal_data": {"image": volume_images(args.slices, args.size, base + i)}}
            for i in range(count)]


async def run_variant(args, plugin: bool, loads: dict[int, list[dict]], run: int) -> list[dict]:
    from vllm.v1.engine.async_llm import AsyncLLM

    variant = "vllm+medpruner" if plugin else "vllm"
    started = time.perf_counter()
    engine = AsyncLLM.from_engine_args(engine_args(args, plugin))
    startup = time.perf_counter() - started
    try:
        rows = []
        for concurrency in args.concurrency:
            level = await serve_level(engine, args, concurrency, loads[concurrency], f"{variant}-{run}")
            row = {"variant": variant, "pass": run, **level, "engine_start_s": startup, "loadavg": os.getloadavg()[0]}
            print(json.dumps(row), flush=True)
            rows.append(row)
        return rows
    finally:
        engine.shutdown()
        del engine
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        await asyncio.sleep(args.settle)  # the engine's processes exit before the next one starts


MEDIAN_FIELDS = ("requests_per_s", "output_tokens_per_s", "ttft_s", "ttft_s_p90", "ttft_s_mean", "latency_s",
                 "prompt_tokens", "wall_s")


def summarize(passes: list[dict]) -> list[dict]:
    """Per (variant, concurrency): the median over passes of each measure."""
    out = []
    for key in sorted({(r["variant"], r["concurrency"]) for r in passes}, key=lambda k: (k[0] != "vllm", k[1])):
        rows = [r for r in passes if (r["variant"], r["concurrency"]) == key]
        out.append({"variant": key[0], "concurrency": key[1], "requests": rows[0]["requests"], "passes": len(rows),
                    **{f: statistics.median(r[f] for r in rows) for f in MEDIAN_FIELDS}})
    return out


def ratios(rows: list[dict]) -> list[dict]:
    by_key = {(r["variant"], r["concurrency"]): r for r in rows}
    out = []
    for concurrency in sorted({r["concurrency"] for r in rows}):
        base, ours = by_key[("vllm", concurrency)], by_key[("vllm+medpruner", concurrency)]
        out.append({
            "concurrency": concurrency,
            "requests_per_s_plugin_over_baseline": ours["requests_per_s"] / base["requests_per_s"],
            "ttft_plugin_over_baseline": ours["ttft_s"] / base["ttft_s"],
            "prompt_tokens_plugin_over_baseline": ours["prompt_tokens"] / base["prompt_tokens"],
        })
    return out


def table(rows: list[dict], ratio_rows: list[dict]) -> str:
    """The README's markdown table."""
    by_key = {(r["variant"], r["concurrency"]): r for r in rows}
    lines = [
        "| concurrency | requests | prompt tokens (vLLM / plugin) | requests/s vLLM | requests/s plugin | ratio "
        "| median TTFT s vLLM | median TTFT s plugin | ratio |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for ratio in ratio_rows:
        c = ratio["concurrency"]
        base, ours = by_key[("vllm", c)], by_key[("vllm+medpruner", c)]
        lines.append(
            f"| {c} | {base['requests']} | {base['prompt_tokens']:.0f} / {ours['prompt_tokens']:.0f} "
            f"| {base['requests_per_s']:.2f} | {ours['requests_per_s']:.2f} "
            f"| {ratio['requests_per_s_plugin_over_baseline']:.2f}x | {base['ttft_s']:.2f} | {ours['ttft_s']:.2f} "
            f"| {ratio['ttft_plugin_over_baseline']:.2f}x |"
        )
    return "\n".join(lines)


def device_tag(device: str) -> str:
    if device == "cpu":
        return f"cpu-{os.cpu_count()}core"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="a Qwen3-VL or Qwen2.5-VL checkpoint (default: tiny)")
    parser.add_argument("--slices", type=int, default=None, help="per volume (default: 16 tiny, 64)")
    parser.add_argument("--size", type=int, default=None, help="slice side in pixels (default: 64 tiny, 384)")
    parser.add_argument("--budget", type=float, default=0.25, help="visual tokens kept, a fraction of the kept slices'")
    parser.add_argument("--gamma", type=float, default=0.05)
    parser.add_argument("--concurrency", type=int, nargs="+", default=list(CONCURRENCY))
    parser.add_argument("--rounds", type=int, default=8, help="measured requests per client at each level")
    parser.add_argument("--min-requests", type=int, default=32, help="measured requests per level at least")
    parser.add_argument("--tokens", type=int, default=16, help="tokens decoded per request (EOS ignored)")
    parser.add_argument("--settle", type=float, default=10.0, help="seconds between engines")
    parser.add_argument("--passes", type=int, default=4,
                        help="engines per variant, the variants taking turns; rows are medians over passes")
    parser.add_argument("--max-num-batched-tokens", type=int, default=None,
                        help="the engine's token budget per step (CPU default: max_model_len)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.45,
                        help="per engine; the two engines of a run live one after the other")
    parser.add_argument("--enforce-eager", action="store_true", help="GPU: no CUDA graphs")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    if min(args.concurrency) < 1 or min(args.rounds, args.tokens, args.min_requests, args.passes) < 1:
        parser.error("--concurrency, --rounds, --min-requests, --tokens and --passes must be at least 1")
    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cpu":
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    tiny = args.model is None
    args.slices = args.slices or (16 if tiny else 64)
    args.size = args.size or (64 if tiny else 384)
    from _common import environment

    load = os.getloadavg()
    loads = {c: level_requests(args, c) for c in args.concurrency}
    with tempfile.TemporaryDirectory() as folder:
        if tiny:
            args.model = tiny_checkpoint(Path(folder) / "tiny_qwen3_vl")

        async def alternate():
            # A shared machine's load drifts: the variants take turns (ABBA...), one engine at a time.
            out = []
            for run in range(args.passes):
                for plugin in ((False, True) if run % 2 == 0 else (True, False)):
                    out += await run_variant(args, plugin, loads, run)
            return out

        passes = asyncio.run(alternate())
    rows = summarize(passes)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    path = args.output or RESULTS / f"vllm-serving-{device_tag(args.device)}-{date}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    import vllm

    ratio_rows = ratios(rows)
    record = {
        "benchmark": "vllm-serving",
        # a shared machine's load explains part of the spread
        "environment": environment()
        | {"vllm": vllm.__version__, "cpus": os.cpu_count(), "loadavg_start": load, "loadavg_end": os.getloadavg()},
        "arguments": vars(args) | {"model": "tiny random Qwen3-VL" if tiny else str(args.model), "output": str(path)},
        "rows": rows,
        "ratios": ratio_rows,
        "passes": passes,
    }
    path.write_text(json.dumps(record, indent=2, default=str))
    print(table(rows, ratio_rows))
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
