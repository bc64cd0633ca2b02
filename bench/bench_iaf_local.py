"""Local-change IAF benchmarks (``iaf_local_select``). CPU: pytest-benchmark (``pytest
bench/bench_iaf_local.py --benchmark-only``), an eager per-slice loop of the rule against the cpp and
torch backends and one read of the volume. GPU: :func:`gpu_benchmarks` (not wired into bench/gpu.py:
its sections need a budget entry as well as a name; call it directly on a GPU machine).

The volume is laid out as Qwen3-VL's pixel rows: each slice an RGB image (the CT slice replicated to
three channels, as a processor does for a grey image) duplicated along the temporal patch (2, as for a
still image), cut into 16 x 16 patches, and 2 x 2 patches merged, so that one merged patch is 6144
contiguous values (3 channels x 2 frames x 2 x 2 patches x 16 x 16): ``block=6144`` compares merged
patch by merged patch."""

from __future__ import annotations

import pytest
import torch
from _common import copy_bandwidth_gbps, cuda_median_ms, drifting_volume

from medpruner_kernels import CPP_AVAILABLE, iaf_local_select, reference

PATCH = 16
MERGE = 2
TEMPORAL = 2
CHANNELS = 3
BLOCK = CHANNELS * TEMPORAL * (MERGE * PATCH) ** 2  # 6144 values per merged patch

# The CPU case: 96 slices of 192 x 192 pixels, 36 merged patches each ([96, 36 * 6144] float32, 85 MB).
# The Qwen3-VL-like layout of 192 slices of 384 x 384 (144 merged patches, 680 MB) takes too long on the
# 2-core development machine; it is the GPU case below.
CPU_SLICES = 96
CPU_SIDE = 192
# Keeps 47 of the 96 slices of this volume (the nearest distance is 0.1% of gamma away from it, far
# beyond float32 rounding, so every backend must give the same mask).
GAMMA = 0.14
CPU_GROUP = f"iaf_local {CPU_SLICES}x{(CPU_SIDE // (MERGE * PATCH)) ** 2}x{BLOCK} f32 cpu"


def qwen_pixel_volume(depth: int, side: int, dtype=torch.float32, *, device="cpu", seed=0) -> torch.Tensor:
    """``[depth, (side / 32)**2 * 6144]``: :func:`_common.drifting_volume` in Qwen-VL's pixel-row order
    (see the module docstring), contiguous."""
    image = drifting_volume(depth, side, side, torch.float32, device=device, seed=seed)
    grid = side // (MERGE * PATCH)
    frames = image[:, None, None].expand(depth, TEMPORAL, CHANNELS, side, side)
    # The processor's order: (merged row, merged col, row in merge, col in merge, channel, frame, y, x).
    tiles = frames.reshape(depth, TEMPORAL, CHANNELS, grid, MERGE, PATCH, grid, MERGE, PATCH)
    tiles = tiles.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return tiles.reshape(depth, grid * grid * BLOCK).to(dtype).contiguous()


def eager_iaf_local_loop(volume: torch.Tensor, gamma: float, block: int) -> torch.Tensor:
    """What a user writes without this package: a Python loop over the slices of a ``[D, N]`` volume,
    the largest block mean of |slice - anchor| per slice, a host read per decision."""
    keep = torch.zeros(volume.shape[0], dtype=torch.bool)
    keep[0] = True
    anchor = volume[0].float()
    for s in range(1, volume.shape[0]):
        current = volume[s].float()
        if (current - anchor).abs().view(-1, block).mean(dim=1).amax().item() > gamma:
            keep[s] = True
            anchor = current
    return keep


@pytest.fixture(scope="module")
def cpu_volume():
    return qwen_pixel_volume(CPU_SLICES, CPU_SIDE)


@pytest.fixture(scope="module")
def expected_keep(cpu_volume):
    """The float64 reference's mask, which the eager loop must also give; about half the slices."""
    cu = torch.tensor([0, CPU_SLICES], dtype=torch.int32)
    keep, _ = reference.iaf_local_select(cpu_volume, GAMMA, cu, BLOCK)
    assert 0.3 < keep.float().mean().item() < 0.7, f"gamma {GAMMA} keeps {int(keep.sum())} of {CPU_SLICES} slices"
    return keep


def test_iaf_local_cpu_eager_loop(benchmark, cpu_volume, expected_keep):
    benchmark.group = CPU_GROUP
    keep = benchmark(eager_iaf_local_loop, cpu_volume, GAMMA, BLOCK)
    assert torch.equal(keep, expected_keep)


def test_iaf_local_cpu_read_floor(benchmark, cpu_volume):
    """The floor: one read of the volume (a sum, which torch runs at memory bandwidth on every core)."""
    benchmark.group = CPU_GROUP
    benchmark(torch.sum, cpu_volume)


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_iaf_local_cpu_backend(benchmark, cpu_volume, expected_keep, backend):
    if backend == "cpp" and not CPP_AVAILABLE:
        pytest.skip("medpruner_kernels._C is not built")
    benchmark.group = CPU_GROUP
    keep = benchmark(iaf_local_select, cpu_volume, GAMMA, block=BLOCK, backend=backend)
    assert torch.equal(keep, eager_iaf_local_loop(cpu_volume, GAMMA, BLOCK))
    assert torch.equal(keep, expected_keep)


# GPU: the Qwen3-VL-like layout (384 x 384 slices: 144 merged patches of 6144 values per slice).
GPU_DEPTHS = (64, 192)
GPU_SIDE = 384
GPU_DTYPES = (torch.float32, torch.bfloat16)
# On these volumes (measured with the cpp backend, float32): 0.14 keeps about half the slices (runs of
# at most 3, so the scan reads only band entries); 0.7 keeps 9 of 64 and 24 of 192 slices, with runs of
# up to 13 slices past the band of 8 (the scan then computes those distances from the two slices).
GPU_REGIMES = (("about-half", 0.14), ("few-keeps", 0.7))


def _local_record(volume, gamma, regime, bandwidth, ms, keep, **extra) -> dict:
    depth = volume.shape[0]
    nbytes = volume.numel() * volume.element_size()
    floor_ms = nbytes / (bandwidth * 1e9) * 1e3
    kept = keep.nonzero().flatten()
    gaps = torch.diff(kept, append=kept.new_tensor([depth]))
    return {
        "op": "iaf_local_select",
        "shape": list(volume.shape),
        "block": BLOCK,
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
    """Check the Triton path against the float64 reference, then time it against the torch backend
    (the rule vectorised per slice position, on the device), the eager loop and the HBM floor (the
    volume's bytes read once at the copy bandwidth measured in this run), in both regimes. Yields the
    records one by one, so a run stopped by a time limit keeps them."""
    bandwidth = copy_bandwidth_gbps(device)
    for dtype in GPU_DTYPES:
        for depth in GPU_DEPTHS:
            volume = qwen_pixel_volume(depth, GPU_SIDE, dtype, device=device, seed=depth)
            cu = torch.tensor([0, depth], dtype=torch.int32)
            for regime, gamma in GPU_REGIMES:
                keep = iaf_local_select(volume, gamma, block=BLOCK, backend="triton")
                torch_keep = iaf_local_select(volume, gamma, block=BLOCK, backend="torch")
                ref_keep, _ = reference.iaf_local_select(volume.cpu(), gamma, cu, BLOCK)
                ms = cuda_median_ms(lambda v=volume, g=gamma: iaf_local_select(v, g, block=BLOCK, backend="triton"))
                torch_ms = cuda_median_ms(
                    lambda v=volume, g=gamma: iaf_local_select(v, g, block=BLOCK, backend="torch"), warmup=1, rep=3
                )
                eager_ms = cuda_median_ms(lambda v=volume, g=gamma: eager_iaf_local_loop(v, g, BLOCK), warmup=1, rep=3)
                yield _local_record(
                    volume, gamma, regime, bandwidth, ms, keep,
                    matches_reference=bool(torch.equal(keep.cpu(), ref_keep)),
                    torch_matches_reference=bool(torch.equal(torch_keep.cpu(), ref_keep)),
                    torch_ms=torch_ms,
                    speedup_vs_torch=torch_ms / ms,
                    eager_loop_ms=eager_ms,
                    speedup_vs_eager=eager_ms / ms,
                )  # fmt: skip
            del volume
