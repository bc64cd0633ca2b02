"""merge_tokens benchmarks. CPU: pytest-benchmark (``pytest bench/bench_merge.py --benchmark-only``):
the straightforward per-slice torch implementation against each compiled/torch backend. GPU:
:func:`gpu_benchmarks`, called by bench/gpu.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _common import cuda_median_ms

from medpruner_kernels import CPP_AVAILABLE, reference
from medpruner_kernels.merge import merge_tokens

# Qwen3-VL after the 2x2 merger: 256 tokens per slice in the LLM's 2048 channels; keys are the last
# vision layer's head-averaged keys (72 channels). The paper keeps a few % of the tokens.
CPU_SLICES, TOKENS, FEATURES, KEY_DIM = 16, 256, 2048, 72
KEEP_FRACTION, CONTEXT_FRAC = 0.05, 0.05


def slice_tokens(slices, tokens, features, key_dim, dtype=torch.float32, device="cpu", seed=0):
    """x ``[N, D]``, keys ``[N, Dk]``, keep ``[N]`` (a random few % per slice) and slice offsets. Keys
    cluster around a few directions per slice, as neighbouring patches of one organ do."""
    # Generated on the target device: a 600-slice volume in 4096 channels is ~630M values.
    gen = torch.Generator(device=device).manual_seed(seed)
    n = slices * tokens
    x = torch.randn(n, features, generator=gen, device=device)
    centres = torch.randn(slices, 8, key_dim, generator=gen, device=device)
    which = torch.randint(0, 8, (slices, tokens), generator=gen, device=device)
    keys = torch.gather(centres, 1, which[..., None].expand(-1, -1, key_dim)).reshape(n, key_dim)
    keys = keys + 0.3 * torch.randn(n, key_dim, generator=gen, device=device)
    keep = torch.rand(n, generator=gen, device=device) < KEEP_FRACTION
    cu = torch.arange(slices + 1, dtype=torch.int32) * tokens
    return x.to(dtype), keys.to(dtype), keep, cu.to(device)


def eager_merge(x, keys, keep, cu_seqlens, context_frac=CONTEXT_FRAC):
    """What a user writes without this package: a loop over slices, each vectorised (a host read of
    the unkept tokens per slice), in float32."""
    x_out, keep_out = x.clone(), keep.clone()
    unit = F.normalize(keys.float(), dim=-1)
    for start, end in reference.segments(cu_seqlens.cpu()):
        rest = (~keep[start:end]).nonzero().flatten() + start
        if rest.numel() == 0:
            continue
        count = max(int(context_frac * (end - start)), 1)
        targets = rest[:: max(1, rest.numel() // count)][:count]
        is_target = torch.zeros_like(keep)
        is_target[targets] = True
        keep_out[targets] = True
        members = rest[~is_target[rest]]
        if members.numel() == 0:
            continue
        owner = (unit[members] @ unit[targets].T).argmax(dim=1)
        sums = torch.zeros(targets.numel(), x.shape[1], device=x.device).index_add_(
            0, owner, x[members].float()
        )
        counts = torch.bincount(owner, minlength=targets.numel())
        merged = targets[counts > 0]
        means = sums[counts > 0] / counts[counts > 0, None]
        x_out[merged] = (x[merged].float() + means).to(x.dtype)
    return x_out, keep_out


@pytest.fixture(scope="module")
def cpu_tokens():
    return slice_tokens(CPU_SLICES, TOKENS, FEATURES, KEY_DIM)


@pytest.fixture(scope="module")
def cpu_expected(cpu_tokens):
    return eager_merge(*cpu_tokens)


GROUP = f"merge {CPU_SLICES}x{TOKENS} tokens, D={FEATURES}, Dk={KEY_DIM}, f32 cpu"


def test_merge_cpu_eager(benchmark, cpu_tokens, cpu_expected):
    benchmark.group = GROUP
    x_out, keep_out = benchmark(eager_merge, *cpu_tokens)
    assert torch.equal(keep_out, cpu_expected[1])


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_merge_cpu_backend(benchmark, cpu_tokens, cpu_expected, backend):
    if backend == "cpp" and not CPP_AVAILABLE:
        pytest.skip("medpruner_kernels._C is not built")
    benchmark.group = GROUP
    x, keys, keep, cu = cpu_tokens
    x_out, keep_out = benchmark(
        merge_tokens, x, keys, keep, cu_seqlens=cu, context_frac=CONTEXT_FRAC, backend=backend
    )
    assert torch.equal(keep_out, cpu_expected[1])
    torch.testing.assert_close(x_out, cpu_expected[0], rtol=1e-5, atol=1e-5)


# (name, slices, tokens per slice, LLM features): a 600-slice CT volume after Qwen3-VL's merger (2B and
# 8B hidden sizes), and MedGemma's 256 tokens per image in 2560 channels.
GPU_CONFIGS = (
    ("qwen3-vl-2b 600 slices", 600, TOKENS, 2048),
    ("qwen3-vl-8b 600 slices", 600, TOKENS, 4096),
    ("medgemma-4b 600 slices", 600, 256, 2560),
)
GPU_CHECK_SLICES = 8  # slices are independent: the float64 check runs on the first few


def _peak_mib(fn, device) -> float:
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def gpu_benchmarks(device="cuda", dtype=torch.bfloat16) -> list[dict]:
    """Check the Triton merge against the float64 reference on the first slices, then time it
    (median, L2 cleared) against the per-slice eager loop and the vectorised torch backend."""
    records = []
    for name, slices, tokens, features in GPU_CONFIGS:
        x, keys, keep, cu = slice_tokens(slices, tokens, features, KEY_DIM, dtype, device, seed=slices)
        run = lambda x=x, keys=keys, keep=keep, cu=cu: merge_tokens(
            x, keys, keep, cu_seqlens=cu, context_frac=CONTEXT_FRAC, backend="triton"
        )
        x_out, keep_out = run()
        rows = GPU_CHECK_SLICES * tokens
        ref_x, ref_keep = reference.merge_tokens(
            x[:rows].cpu(), keys[:rows].cpu(), keep[:rows].cpu(), cu[: GPU_CHECK_SLICES + 1].cpu(),
            context_frac=CONTEXT_FRAC,
        )  # fmt: skip
        max_error = float((x_out[:rows].cpu().double() - ref_x).abs().max())
        eager = lambda x=x, keys=keys, keep=keep, cu=cu: eager_merge(x, keys, keep, cu)
        vectorised = lambda x=x, keys=keys, keep=keep, cu=cu: merge_tokens(
            x, keys, keep, cu_seqlens=cu, context_frac=CONTEXT_FRAC, backend="torch"
        )
        record = {
            "op": "merge_tokens",
            "config": name,
            "slices": slices,
            "tokens_per_slice": tokens,
            "features": features,
            "key_dim": KEY_DIM,
            "dtype": str(dtype).replace("torch.", ""),
            "kept": int(keep_out.sum()),
            "keep_matches_reference": bool(torch.equal(keep_out[:rows].cpu(), ref_keep)),
            "max_abs_error_vs_float64": max_error,
            # One bfloat16 rounding of the merged features (|x| stays below ~8 here).
            "matches_reference": max_error <= 8 * torch.finfo(dtype).eps,
            "ms": cuda_median_ms(run),
            "peak_mib": _peak_mib(run, device),
            "eager_loop_ms": cuda_median_ms(eager, warmup=2, rep=10),
            "torch_backend_ms": cuda_median_ms(vectorised, warmup=2, rep=10),
        }
        record["speedup_vs_eager"] = record["eager_loop_ms"] / record["ms"]
        records.append(record)
        del x, keys, keep
        torch.cuda.empty_cache()
    return records
