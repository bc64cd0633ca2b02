"""Private helpers shared by the op files' Triton paths (importance and merge), and the switch that lets
bench/codegen.py record under the interpreter the launch configurations a GPU gets."""

from __future__ import annotations

import contextlib

import torch

from medpruner_kernels._dispatch import TRITON_AVAILABLE

_record_gpu_configs = False


def interpreter_tiles(device: torch.device) -> bool:
    """True when kernels on ``device`` run in the Triton interpreter and should use small tiles (it runs
    every tile op in numpy). False on CUDA, and under :func:`gpu_launch_configs`."""
    return device.type != "cuda" and not _record_gpu_configs


def _bf16_interpreted(t: torch.Tensor) -> bool:
    """bfloat16 ``tl.dot`` needs a float32 upcast in the Triton 3.9 interpreter, which gets it wrong;
    under :func:`gpu_launch_configs` the launch is recorded as a GPU makes it (results then do not matter)."""
    return t.dtype == torch.bfloat16 and interpreter_tiles(t.device)


@contextlib.contextmanager
def gpu_launch_configs():
    """Ops pick the tile sizes and flags of a CUDA launch while running in the interpreter. For the
    codegen recorder only: results computed this way may be wrong (bfloat16 dots, large tiles)."""
    global _record_gpu_configs
    previous, _record_gpu_configs = _record_gpu_configs, True
    try:
        yield
    finally:
        _record_gpu_configs = previous


if TRITON_AVAILABLE:
    import triton
    import triton.language as tl

    @triton.jit
    def _tile_dot(a, b, IEEE_DOT: tl.constexpr, UPCAST: tl.constexpr):
        """fp32-accumulating tile product; ``IEEE_DOT`` avoids tf32 for float32 inputs, ``UPCAST``
        multiplies in float32 (the Triton 3.9 interpreter gets bfloat16 ``tl.dot`` wrong)."""
        if UPCAST:
            product = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        elif IEEE_DOT:
            product = tl.dot(a, b, input_precision="ieee")
        else:
            product = tl.dot(a, b)
        return product
