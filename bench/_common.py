"""Shared benchmark helpers: realistic synthetic volumes, the eager baselines, GPU timing, and the
JSON records bench/gpu.py writes."""

from __future__ import annotations

import datetime
import platform
import subprocess
from pathlib import Path

import torch


def drifting_volume(depth: int, height: int, width: int, dtype=torch.float32, *, device="cpu", seed=0):
    """A CT-like stack on the models' [-1, 1] scale: smooth anatomy that drifts slowly along the slice
    axis, with a few abrupt changes (organ boundaries), plus noise."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    coarse = torch.rand(depth // 8 + 2, 1, height // 16 + 1, width // 16 + 1, generator=gen)
    smooth = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    # Linear interpolation along the slice axis (cheap, memory-light) between the coarse key slices.
    position = torch.linspace(0, coarse.shape[0] - 1.001, depth)
    low = position.floor().long()
    frac = (position - low)[:, None, None]
    volume = smooth[low, 0] * (1 - frac) + smooth[low + 1, 0] * frac
    volume = volume * 2 - 1 + 0.02 * torch.randn(depth, height, width, generator=gen)
    if dtype in (torch.uint8,):
        volume = ((volume + 1) * 127.5).clamp(0, 255)
    elif dtype == torch.int16:
        volume = volume * 1000
    return volume.to(dtype).to(device)


def eager_iaf_loop(volume: torch.Tensor, gamma: float) -> torch.Tensor:
    """What a user writes without this package: a Python loop, one distance per slice, a host read
    per decision."""
    keep = torch.zeros(volume.shape[0], dtype=torch.bool)
    keep[0] = True
    anchor = volume[0].float()
    for s in range(1, volume.shape[0]):
        current = volume[s].float()
        if (current - anchor).abs().mean().item() > gamma:
            keep[s] = True
            anchor = current
    return keep


def git_revision() -> dict:
    """The checkout's commit and whether tracked files differ from it; None for both outside a git
    checkout (a copied tree) or without git."""
    root = Path(__file__).resolve().parent.parent

    def git(*args):
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10, check=True).stdout

    try:
        return {"git_commit": git("rev-parse", "HEAD").strip(), "git_dirty": bool(git("status", "--porcelain", "-uno"))}
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": None, "git_dirty": None}


def environment() -> dict:
    """Where and with what a result was measured: UTC date, package, torch, triton and Python
    versions, git commit, CPU, and the CUDA device name ("cpu" without one)."""
    import medpruner_kernels

    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "medpruner_kernels": medpruner_kernels.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        **git_revision(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    else:
        info["device"] = "cpu"
    return info


def cuda_median_ms(fn, *, warmup=25, rep=100) -> float:
    """Median time of ``fn`` in ms on the current CUDA device (triton.testing.do_bench clears L2
    between runs, so cached inputs do not flatter the kernel)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def copy_bandwidth_gbps(device, nbytes: int = 1 << 30) -> float:
    """HBM bandwidth measured in this run: a device-to-device copy reads and writes nbytes."""
    src = torch.empty(nbytes // 2, dtype=torch.float16, device=device)
    dst = torch.empty_like(src)
    ms = cuda_median_ms(lambda: dst.copy_(src))
    return 2 * nbytes / (ms * 1e-3) / 1e9
