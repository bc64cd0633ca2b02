"""attention_importance benchmarks. CPU: pytest-benchmark (``pytest bench/bench_importance.py
--benchmark-only``): the eager dense recomputation (what pruning code such as HiPrune does: the
softmax matrix materialised per segment), each compiled/torch backend, and one SDPA forward of the same
layer (the yardstick of DESIGN.md's target). GPU: :func:`gpu_benchmarks`, called by bench/gpu.py."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from _common import cuda_median_ms

from medpruner_kernels import CPP_AVAILABLE, reference
from medpruner_kernels.importance import attention_importance

# Qwen3-VL's vision tower: 16 heads of 72 channels; 4 slices of 1024 patches keep a CPU run to seconds.
CPU_SEGMENTS, CPU_TOKENS, CPU_HEADS, CPU_HEAD_DIM = 4, 1024, 16, 72


def layer_inputs(segments, tokens, heads, head_dim, dtype=torch.float32, device="cpu", seed=0):
    """q, k, v ``[N, H, Dh]`` of one attention layer over equal-length segments, and their offsets.
    Keys share a per-segment direction (ViT keys are far from isotropic), so attention is peaked."""
    # Generated on the target device: a 600-slice layer is ~700M values per tensor.
    gen = torch.Generator(device=device).manual_seed(seed)
    n = segments * tokens
    draw = lambda *shape: torch.randn(*shape, generator=gen, device=device)
    shared = draw(segments, 1, heads, head_dim).expand(segments, tokens, heads, head_dim)
    q = draw(n, heads, head_dim)
    k = draw(n, heads, head_dim) + 0.5 * shared.reshape(n, heads, head_dim)
    v = draw(n, heads, head_dim)
    cu = torch.arange(segments + 1, dtype=torch.int32) * tokens
    return q.to(dtype), k.to(dtype), v.to(dtype), cu.to(device)


def eager_dense_importance(q, k, cu_seqlens, scale=None):
    """What a user writes without this package: per segment, the full ``[H, L, L]`` softmax (in
    float32, as Hugging Face's eager attention does), its head mean and its query sum."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out = torch.empty(q.shape[0], dtype=torch.float32, device=q.device)
    for start, end in reference.segments(cu_seqlens.cpu()):
        qs, ks = q[start:end].transpose(0, 1), k[start:end].transpose(0, 1)
        probs = torch.softmax(torch.matmul(qs, ks.transpose(1, 2)) * scale, dim=-1, dtype=torch.float32)
        out[start:end] = probs.mean(dim=0).sum(dim=0)
    return out


def sdpa_forward(q, k, v, segments):
    """One attention forward of the same layer (equal-length segments batched)."""
    shape = (segments, -1, q.shape[1], q.shape[2])
    return F.scaled_dot_product_attention(*(t.reshape(shape).transpose(1, 2) for t in (q, k, v)))


@pytest.fixture(scope="module")
def cpu_layer():
    return layer_inputs(CPU_SEGMENTS, CPU_TOKENS, CPU_HEADS, CPU_HEAD_DIM)


@pytest.fixture(scope="module")
def cpu_expected(cpu_layer):
    q, k, _, cu = cpu_layer
    return eager_dense_importance(q, k, cu)


GROUP = f"importance {CPU_SEGMENTS}x{CPU_TOKENS} tokens, {CPU_HEADS}x{CPU_HEAD_DIM} heads, f32 cpu"


def test_importance_cpu_eager_dense(benchmark, cpu_layer, cpu_expected):
    benchmark.group = GROUP
    q, k, _, cu = cpu_layer
    torch.testing.assert_close(benchmark(eager_dense_importance, q, k, cu), cpu_expected)


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_importance_cpu_backend(benchmark, cpu_layer, cpu_expected, backend):
    if backend == "cpp" and not CPP_AVAILABLE:
        pytest.skip("medpruner_kernels._C is not built")
    benchmark.group = GROUP
    q, k, _, cu = cpu_layer
    got = benchmark(attention_importance, q, k, cu_seqlens=cu, backend=backend)
    torch.testing.assert_close(got, cpu_expected, rtol=1e-4, atol=1e-4)


def test_importance_cpu_sdpa_forward(benchmark, cpu_layer):
    benchmark.group = GROUP
    q, k, v, _ = cpu_layer
    out = benchmark(sdpa_forward, q, k, v, CPU_SEGMENTS)
    assert out.shape == (CPU_SEGMENTS, CPU_HEADS, CPU_TOKENS, CPU_HEAD_DIM)


# (name, segments, tokens per segment, heads, head dim)
GPU_CONFIGS = (
    ("qwen3-vl layer", 64, 1024, 16, 72),
    ("qwen3-vl layer", 256, 1024, 16, 72),
    ("qwen3-vl layer", 600, 1024, 16, 72),
    ("siglip-896", 1, 4096, 16, 72),
    ("qwen2.5-vl layer", 64, 1024, 16, 80),
    ("dh64", 64, 1024, 16, 64),
    ("dh128", 64, 1024, 16, 128),
)
# Segments are independent: the float64 check runs on the first few, which bounds its cost.
GPU_CHECK_SEGMENTS = 4


def _peak_mib(fn, device) -> float:
    """Memory fn allocates beyond what is already held (its scratch and output), in MiB."""
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def _flash_colreduce():
    if importlib.util.find_spec("flash_colreduce") is None:
        return None
    from flash_colreduce import flash_colreduce

    return flash_colreduce


def gpu_benchmarks(device="cuda", dtype=torch.bfloat16) -> list[dict]:
    """Check the Triton kernels against the float64 reference, then time them (median, L2 cleared)
    against the eager dense recomputation, one SDPA forward of the layer and flash_colreduce (when
    installed), with the peak extra memory of each."""
    colreduce = _flash_colreduce()
    records = []
    for name, segments, tokens, heads, head_dim in GPU_CONFIGS:
        q, k, v, cu = layer_inputs(segments, tokens, heads, head_dim, dtype, device, seed=segments)
        run = lambda q=q, k=k, cu=cu: attention_importance(q, k, cu_seqlens=cu, backend="triton")
        got = run()
        check = min(segments, GPU_CHECK_SEGMENTS) * tokens
        expected = reference.attention_importance(
            q[:check], k[:check], cu[: min(segments, GPU_CHECK_SEGMENTS) + 1]
        )
        max_error = float((got[:check].double() - expected).abs().max())
        eager = lambda q=q, k=k, cu=cu: eager_dense_importance(q, k, cu)
        sdpa = lambda q=q, k=k, v=v, s=segments: sdpa_forward(q, k, v, s)
        record = {
            "op": "attention_importance",
            "config": name,
            "segments": segments,
            "tokens_per_segment": tokens,
            "heads": heads,
            "head_dim": head_dim,
            "dtype": str(dtype).replace("torch.", ""),
            "max_abs_error_vs_float64": max_error,
            "matches_reference": max_error <= 1e-4 * max(1.0, float(expected.abs().max())),
            "ms": cuda_median_ms(run),
            "peak_mib": _peak_mib(run, device),
            "eager_dense_ms": cuda_median_ms(eager, warmup=2, rep=10),
            "eager_dense_peak_mib": _peak_mib(eager, device),
            "sdpa_forward_ms": cuda_median_ms(sdpa),
            "sdpa_forward_peak_mib": _peak_mib(sdpa, device),
        }
        record["speedup_vs_eager"] = record["eager_dense_ms"] / record["ms"]
        record["ratio_to_sdpa"] = record["ms"] / record["sdpa_forward_ms"]
        if colreduce is not None:
            # Its [B, H, L, Dh] layout, made once outside the timing.
            shape = (segments, tokens, heads, head_dim)
            q_bhld = q.view(shape).transpose(1, 2).contiguous()
            k_bhld = k.view(shape).transpose(1, 2).contiguous()

            def baseline(q=q_bhld, k=k_bhld):
                return colreduce(q, k, reduction="sum").float().mean(dim=1).reshape(-1)

            record["flash_colreduce_max_abs_diff"] = float((baseline() - got).abs().max())
            record["flash_colreduce_ms"] = cuda_median_ms(baseline)
            record["flash_colreduce_peak_mib"] = _peak_mib(baseline, device)
            del q_bhld, k_bhld
        records.append(record)
        del q, k, v
        torch.cuda.empty_cache()
    return records
