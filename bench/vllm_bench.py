"""vLLM with and without the MedPruner plugin: time to first token and throughput, one run, same volumes.

    python bench/vllm_bench.py                                   # tiny random Qwen3-VL on CPU (~1-2 min)
    python bench/vllm_bench.py --model /ckpt/Qwen3-VL-8B-Instruct --slices 64 256   # a real checkpoint, GPU

Both variants serve the same checkpoint in this process, one after the other (upstream vLLM first, then
``medpruner.vllm`` with ``--budget``/``--gamma``), each on the same synthetic CT-like volumes (one volume
per request, one image per slice). Caches that would let a repeat skip work are off (prefix caching,
the multimodal processor cache) and every request gets a volume of its own seed, so each request runs
the processor (where IAF runs), the vision tower and the prefill.

* ``ttft_s``: wall time of one request generating one token (processor + tower + prefill), the median
  over ``--repeats`` requests, after one warm-up request;
* ``throughput``: ``--batch`` requests submitted together, each decoding exactly ``--tokens`` tokens
  (EOS ignored): output tokens per second and requests per second over the batch's wall time, the
  median over ``--repeats`` batches.

Each row also has the prompt length vLLM saw (the pruned length with the plugin). The ratios
(``plugin / baseline`` for TTFT, ``baseline / plugin`` for time per batch) come from the same run.
Writes ``bench/results/vllm-<device>-<date>.json``.
"""

from __future__ import annotations

import argparse
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


def engine_kwargs(args, plugin: bool) -> dict:
    import medpruner.vllm as mv

    longest = max(args.slices)
    kwargs = {"model": str(args.model)}
    if plugin:
        mv.register()
        kwargs = mv.llm_kwargs(args.model, budget=args.budget, gamma=args.gamma)
    kwargs.update(
        max_model_len=longest * tokens_per_slice(args.model, args.size) + 512,
        limit_mm_per_prompt={"image": longest},
        enable_prefix_caching=False,
        mm_processor_cache_gb=0,
        max_num_seqs=max(args.batch, 1),
        seed=0,
    )
    if args.device == "cpu":
        kwargs.update(dtype="float32", enforce_eager=True)
        kwargs["max_num_batched_tokens"] = kwargs["max_model_len"]
    else:
        kwargs.update(dtype="bfloat16", gpu_memory_utilization=args.gpu_memory_utilization)
        if args.enforce_eager:
            kwargs["enforce_eager"] = True
    return kwargs


def measure(llm, args, depth: int, seeds) -> dict:
    from vllm import SamplingParams

    first = SamplingParams(max_tokens=1, temperature=0)
    decode = SamplingParams(max_tokens=args.tokens, temperature=0, ignore_eos=True)

    def request(seed):
        return {"prompt": prompt(depth), "multi_modal_data": {"image": volume_images(depth, args.size, seed)}}

    llm.generate(request(next(seeds)), first, use_tqdm=False)  # warm-up
    ttft, prompt_tokens = [], []
    for _ in range(args.repeats):
        req = request(next(seeds))
        start = time.perf_counter()
        out = llm.generate(req, first, use_tqdm=False)
        ttft.append(time.perf_counter() - start)
        prompt_tokens.append(len(out[0].prompt_token_ids))
    batch_seconds = []
    for _ in range(args.repeats):
        reqs = [request(next(seeds)) for _ in range(args.batch)]
        start = time.perf_counter()
        outs = llm.generate(reqs, decode, use_tqdm=False)
        batch_seconds.append(time.perf_counter() - start)
        if any(len(o.outputs[0].token_ids) != args.tokens for o in outs):
            raise RuntimeError("a request stopped before --tokens tokens although EOS is ignored")
    seconds = statistics.median(batch_seconds)
    return {
        "slices": depth,
        "prompt_tokens": statistics.median(prompt_tokens),
        "ttft_s": statistics.median(ttft),
        "ttft_s_min": min(ttft),
        "ttft_s_all": ttft,
        "batch_s": seconds,
        "batch_s_min": min(batch_seconds),
        "batch_s_all": batch_seconds,
        "output_tokens_per_s": args.batch * args.tokens / seconds,
        "requests_per_s": args.batch / seconds,
    }


def run_variant(args, plugin: bool) -> list[dict]:
    from vllm import LLM

    llm = LLM(**engine_kwargs(args, plugin))
    try:
        rows = []
        for depth in args.slices:
            # the same seeds for both variants: the same volumes in the same order
            seeds = iter(range(1000 * depth, 1000 * depth + 2 + args.repeats * (1 + args.batch)))
            row = {"variant": "vllm+medpruner" if plugin else "vllm", **measure(llm, args, depth, seeds)}
            print(json.dumps(row), flush=True)
            rows.append(row)
        return rows
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def ratios(rows: list[dict]) -> list[dict]:
    by_key = {(r["variant"], r["slices"]): r for r in rows}
    out = []
    for depth in sorted({r["slices"] for r in rows}):
        base, ours = by_key[("vllm", depth)], by_key[("vllm+medpruner", depth)]
        out.append({
            "slices": depth,
            "ttft_plugin_over_baseline": ours["ttft_s"] / base["ttft_s"],
            "throughput_plugin_over_baseline": ours["output_tokens_per_s"] / base["output_tokens_per_s"],
            "prompt_tokens_plugin_over_baseline": ours["prompt_tokens"] / base["prompt_tokens"],
        })
    return out


def device_tag(device: str) -> str:
    if device == "cpu":
        return f"cpu-{os.cpu_count()}core"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="a Qwen3-VL or Qwen2.5-VL checkpoint (default: tiny)")
    parser.add_argument("--slices", nargs="+", type=int, default=None, help="per volume (default: 16 tiny, 64 256)")
    parser.add_argument("--size", type=int, default=None, help="slice side in pixels (default: 64 tiny, 384)")
    parser.add_argument("--budget", type=float, default=0.25, help="visual tokens kept, a fraction of the kept slices'")
    parser.add_argument("--gamma", type=float, default=0.05)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4, help="requests per throughput batch")
    parser.add_argument("--tokens", type=int, default=16, help="tokens decoded per request in the batch")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.45,
                        help="per engine; the two engines of a run live one after the other")
    parser.add_argument("--enforce-eager", action="store_true", help="GPU: no CUDA graphs")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.batch < 1 or args.tokens < 1:
        parser.error("--repeats, --batch and --tokens must be at least 1")
    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cpu":
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    tiny = args.model is None
    args.slices = args.slices or ([16] if tiny else [64, 256])
    args.size = args.size or (64 if tiny else 384)
    from _common import environment

    load = os.getloadavg()
    with tempfile.TemporaryDirectory() as folder:
        if tiny:
            args.model = tiny_checkpoint(Path(folder) / "tiny_qwen3_vl")
        rows = run_variant(args, plugin=False) + run_variant(args, plugin=True)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    path = args.output or RESULTS / f"vllm-{device_tag(args.device)}-{date}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    import vllm

    record = {
        "benchmark": "vllm",
        # a shared machine's load explains the spread of the repeats
        "environment": environment()
        | {"vllm": vllm.__version__, "loadavg_start": load, "loadavg_end": os.getloadavg()},
        "arguments": vars(args) | {"model": "tiny random Qwen3-VL" if tiny else str(args.model), "output": str(path)},
        "rows": rows,
        "ratios": ratios(rows),
    }
    path.write_text(json.dumps(record, indent=2, default=str))
    print(json.dumps(record["ratios"], indent=2))
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
