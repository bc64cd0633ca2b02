"""IAF benchmarks. CPU: pytest-benchmark (``pytest bench/bench_iaf.py --benchmark-only``), the
eager per-slice loop against each compiled/torch backend. GPU: :func:`gpu_benchmarks`, called by
bench/gpu.py."""

from __future__ import annotations

import pytest
import torch
from _common import copy_bandwidth_gbps, cuda_median_ms, drifting_volume, eager_iaf_loop

from medpruner_kernels import CPP_AVAILABLE, iaf_select, reference

CPU_SHAPE = (192, 384, 384)  # the CPU target: float32, 2 cores
GAMMA = 0.05  # the paper's default on the [-1, 1] scale


@pytest.fixture(scope="module")
def cpu_volume():
    return drifting_volume(*CPU_SHAPE, torch.float32)


def test_iaf_cpu_eager_loop(benchmark, cpu_volume):
    benchmark.group = "iaf 192x384x384 f32 cpu"
    benchmark(eager_iaf_loop, cpu_volume, GAMMA)


def test_iaf_cpu_read_floor(benchmark, cpu_volume):
    """The floor: one read of the volume (a sum, which torch runs at memory bandwidth on every core)."""
    benchmark.group = "iaf 192x384x384 f32 cpu"
    benchmark(torch.sum, cpu_volume)


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_iaf_cpu_backend(benchmark, cpu_volume, backend):
    if backend == "cpp" and not CPP_AVAILABLE:
        pytest.skip("medpruner_kernels._C is not built")
    benchmark.group = "iaf 192x384x384 f32 cpu"
    keep = benchmark(iaf_select, cpu_volume, GAMMA, backend=backend)
    assert torch.equal(keep, eager_iaf_loop(cpu_volume, GAMMA))


NARROW_DTYPES = (torch.bfloat16, torch.float16, torch.uint8, torch.int16)


def _gamma_units(dtype: torch.dtype) -> float:
    """One unit of the [-1, 1] scale in drifting_volume's encoding of ``dtype``."""
    return 1.0 if dtype.is_floating_point else (127.5 if dtype == torch.uint8 else 1000.0)


@pytest.fixture(scope="module", params=NARROW_DTYPES, ids=lambda dtype: str(dtype).replace("torch.", ""))
def narrow_volume(request):
    """The same volume in the 16- and 8-bit dtypes: the C++ kernel widens them to float, so these
    time the conversions (no read floor here: torch sums integers through int64, far off the memory
    speed)."""
    return drifting_volume(*CPU_SHAPE, request.param)


def _narrow_group(volume: torch.Tensor) -> str:
    return f"iaf 192x384x384 {str(volume.dtype).replace('torch.', '')} cpu"


def test_iaf_cpu_narrow_eager_loop(benchmark, narrow_volume):
    benchmark.group = _narrow_group(narrow_volume)
    benchmark(eager_iaf_loop, narrow_volume, GAMMA * _gamma_units(narrow_volume.dtype))


def test_iaf_cpu_narrow_backend(benchmark, narrow_volume):
    if not CPP_AVAILABLE:
        pytest.skip("medpruner_kernels._C is not built")
    benchmark.group = _narrow_group(narrow_volume)
    gamma = GAMMA * _gamma_units(narrow_volume.dtype)
    keep = benchmark(iaf_select, narrow_volume, gamma, backend="cpp")
    assert torch.equal(keep, eager_iaf_loop(narrow_volume, gamma))


GPU_DEPTHS = (64, 256, 1024)
GPU_SIDES = (384, 512)
GPU_DTYPES = (torch.float32, torch.bfloat16)
# gamma in units of the [-1, 1] scale: 0.005 keeps most slices of drifting_volume (its noise alone
# moves a slice by ~0.016), 0.25 keeps a slice every few dozen (runs far longer than the band).
GPU_REGIMES = (("many-keeps", 0.005), ("few-keeps", 0.25))


def _iaf_record(volume, gamma, regime, bandwidth, ms, keep, **extra) -> dict:
    depth = volume.shape[0]
    nbytes = volume.numel() * volume.element_size()
    floor_ms = nbytes / (bandwidth * 1e9) * 1e3
    kept = keep.nonzero().flatten()
    gaps = torch.diff(kept, append=kept.new_tensor([depth]))
    return {
        "op": "iaf_select",
        "shape": list(volume.shape),
        "dtype": str(volume.dtype).replace("torch.", ""),
        "regime": regime,
        "gamma": gamma,
        "kept": int(kept.numel()),
        "longest_run": int(gaps.max()),
        "ms": ms,
        "gbps": nbytes / (ms * 1e-3) / 1e9,
        "floor_ms": floor_ms,
        "ratio_to_floor": ms / floor_ms,
        "copy_bandwidth_gbps": bandwidth,
        **extra,
    }


def gpu_benchmarks(device="cuda"):
    """Check the Triton IAF against the float64 reference, then time it against the eager loop and
    the HBM floor (the volume's bytes read once at the copy bandwidth measured in this run), in both
    regimes: many keeps (the anchor stays within the band) and few keeps (long runs: row requests
    read those slices once more); first, per dtype, a CUDA graph captured once (no max_seqlen) and
    replayed. Yields the records one by one, so a section stopped by its time budget keeps them."""
    bandwidth = copy_bandwidth_gbps(device)
    for dtype in GPU_DTYPES:
        scale = _gamma_units(dtype)
        yield from _graph_records(device, dtype, scale, bandwidth)
        for side in GPU_SIDES:
            for depth in GPU_DEPTHS:
                volume = drifting_volume(depth, side, side, dtype, device=device, seed=depth)
                for regime, unit_gamma in GPU_REGIMES:
                    gamma = unit_gamma * scale
                    keep = iaf_select(volume, gamma, backend="triton")
                    ref_keep, _ = reference.iaf_select(
                        volume.reshape(depth, -1).cpu(), gamma, torch.tensor([0, depth], dtype=torch.int32)
                    )
                    ms = cuda_median_ms(lambda v=volume, g=gamma: iaf_select(v, g, backend="triton"))
                    eager_ms = cuda_median_ms(lambda v=volume, g=gamma: eager_iaf_loop(v, g), warmup=1, rep=3)
                    yield _iaf_record(
                        volume, gamma, regime, bandwidth, ms, keep,
                        matches_reference=bool(torch.equal(keep.cpu(), ref_keep)),
                        eager_loop_ms=eager_ms,
                        speedup_vs_eager=eager_ms / ms,
                    )  # fmt: skip


def _graph_records(device, dtype, scale, bandwidth):
    """The op captured once in a CUDA graph (its launch count does not depend on the data, so no
    max_seqlen is needed) and replayed: the time without per-launch CPU overhead."""
    depth = 1024
    volume = drifting_volume(depth, 512, 512, dtype, device=device, seed=depth)
    for regime, unit_gamma in GPU_REGIMES:
        gamma = unit_gamma * scale
        expected = iaf_select(volume, gamma, backend="triton")  # compiles the kernels outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = iaf_select(volume, gamma, backend="triton")
        graph.replay()
        torch.cuda.synchronize()
        ms = cuda_median_ms(graph.replay)
        ref_keep, _ = reference.iaf_select(
            volume.reshape(depth, -1).cpu(), gamma, torch.tensor([0, depth], dtype=torch.int32)
        )
        yield _iaf_record(
            volume, gamma, regime, bandwidth, ms, captured,
            cuda_graph=True,
            matches_reference=bool(torch.equal(captured.cpu(), ref_keep)),
            matches_eager=bool(torch.equal(captured, expected)),
        )  # fmt: skip
