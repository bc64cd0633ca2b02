"""nucleus_select benchmarks. CPU: pytest-benchmark, the plain torch sort + cumsum + scatter a user
writes against each backend. GPU: :func:`gpu_benchmarks`, called by bench/gpu.py."""

from __future__ import annotations

import pytest
import torch
from _common import cuda_median_ms

from medpruner_kernels import CPP_AVAILABLE, nucleus_select

SLICES, TOKENS = 1000, 1000  # the shape: 10^3 slices x 10^3 tokens
TAU, TEMPERATURE = 0.9, 2.0  # the paper's defaults for Qwen3-VL and MedGemma


def sort_cumsum_scatter(scores: torch.Tensor, tau: float, temperature: float) -> torch.Tensor:
    """The baseline: softmax, a stable descending sort, cumsum, and the kept ranks scattered back."""
    p = torch.softmax(scores.float() / temperature, dim=-1)
    sorted_p, order = torch.sort(p, dim=-1, descending=True, stable=True)
    count = (sorted_p.cumsum(dim=-1) < tau).sum(dim=-1, keepdim=True) + 1
    kept_rank = torch.arange(scores.shape[-1], device=scores.device) < count
    return torch.zeros_like(kept_rank).scatter(-1, order, kept_rank)


def attention_like_scores(slices: int, tokens: int, *, device="cpu", seed=0) -> torch.Tensor:
    """Heavy-tailed importances (a few sink tokens, many near-uniform ones), summing to the slice length
    per slice like the scores attention_importance returns."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    raw = torch.rand(slices, tokens, generator=gen) ** 8
    raw[:, :4] += 5.0
    return (raw / raw.sum(dim=1, keepdim=True) * tokens).to(device)


@pytest.fixture(scope="module")
def cpu_scores():
    return attention_like_scores(SLICES, TOKENS)


def test_nucleus_cpu_sort_cumsum_scatter(benchmark, cpu_scores):
    benchmark.group = "nucleus 1000x1000 cpu"
    benchmark(sort_cumsum_scatter, cpu_scores, TAU, TEMPERATURE)


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_nucleus_cpu_backend(benchmark, cpu_scores, backend):
    if backend == "cpp" and not CPP_AVAILABLE:
        pytest.skip("medpruner_kernels._C is not built")
    benchmark.group = "nucleus 1000x1000 cpu"
    keep = benchmark(nucleus_select, cpu_scores, TAU, temperature=TEMPERATURE, backend=backend)
    # Slices may differ only where fp32 and float64 prefix sums straddle tau; these scores have none.
    assert torch.equal(keep, sort_cumsum_scatter(cpu_scores.double(), TAU, TEMPERATURE))


def top_counts_sort(scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """The fixed-budget baseline: a stable descending sort per slice, the first counts[i] scattered back."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    kept_rank = torch.arange(scores.shape[-1], device=scores.device) < counts[:, None]
    return torch.zeros_like(kept_rank).scatter(-1, order, kept_rank)


@pytest.fixture(scope="module")
def budget_counts():
    """The token budget: 5% of the tokens of every slice (DESIGN.md "Fixed token budget")."""
    return torch.full((SLICES,), TOKENS // 20, dtype=torch.int64)


def test_nucleus_cpu_counts_eager_sort(benchmark, cpu_scores, budget_counts):
    benchmark.group = "nucleus counts 1000x1000 cpu"
    benchmark(top_counts_sort, cpu_scores, budget_counts)


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_nucleus_cpu_counts_backend(benchmark, cpu_scores, budget_counts, backend):
    if backend == "cpp" and not CPP_AVAILABLE:
        pytest.skip("medpruner_kernels._C is not built")
    benchmark.group = "nucleus counts 1000x1000 cpu"
    keep = benchmark(
        nucleus_select, cpu_scores, TAU, temperature=TEMPERATURE, counts=budget_counts, backend=backend
    )
    assert torch.equal(keep, top_counts_sort(cpu_scores.double(), budget_counts))


def gpu_benchmarks(device="cuda") -> list[dict]:
    """Check the Triton kernel against the float64 baseline, then time it against sort + cumsum +
    scatter for 10^2..10^4 slices of 1000 tokens (bytes read once: the scores; written: the mask)."""
    records = []
    for slices in (100, 1000, 10000):
        scores = attention_like_scores(slices, TOKENS, device=device, seed=slices)
        keep = nucleus_select(scores, TAU, temperature=TEMPERATURE, backend="triton")
        expected = sort_cumsum_scatter(scores.double(), TAU, TEMPERATURE)
        ms = cuda_median_ms(lambda s=scores: nucleus_select(s, TAU, temperature=TEMPERATURE, backend="triton"))
        baseline_ms = cuda_median_ms(lambda s=scores: sort_cumsum_scatter(s, TAU, TEMPERATURE))
        nbytes = scores.numel() * (scores.element_size() + 1)
        records.append(
            {
                "op": "nucleus_select",
                "shape": [slices, TOKENS],
                "dtype": "float32",
                "mismatched_slices": int((keep != expected).any(dim=1).sum()),
                "ms": ms,
                "gbps": nbytes / (ms * 1e-3) / 1e9,
                "sort_cumsum_scatter_ms": baseline_ms,
                "speedup_vs_sort_cumsum_scatter": baseline_ms / ms,
            }
        )
    return records
