"""Backend selection: "triton" on CUDA, "cpp" (the compiled extension) or "torch" on CPU.

The compiled extension holds CPU kernels only: on CUDA tensors ``auto`` picks Triton, or torch when
Triton is missing, never "cpp".

``MEDPRUNER_BACKEND`` overrides ``backend="auto"``. An automatic choice falls back quietly (with one
warning when the compiled extension is missing); an explicit request that cannot be met raises with
what it needs.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import warnings

import torch

logger = logging.getLogger("medpruner_kernels")

BACKENDS = ("auto", "triton", "cpp", "torch")

try:
    from medpruner_kernels import _C  # type: ignore[attr-defined]

    CPP_AVAILABLE = True
    CPP_IMPORT_ERROR: str | None = None
except ImportError as err:
    _C = None
    CPP_AVAILABLE = False
    _package = os.path.dirname(os.path.abspath(__file__))
    # Without a built _C*.so, Python's own message ("cannot import name '_C' from partially initialized
    # module ... (most likely due to a circular import)") points at the wrong cause.
    if any(name.startswith("_C") and name.endswith((".so", ".pyd")) for name in os.listdir(_package)):
        CPP_IMPORT_ERROR = str(err)
    else:
        CPP_IMPORT_ERROR = (f"no compiled extension _C in {_package}: this copy was never built (pip install "
                            "--no-build-isolation ., or python setup.py build_ext --inplace in a checkout)")
    logger.info("medpruner_kernels._C is not available (%s); using Triton/torch paths", err)

# find_spec: the flags are known before (and without) importing triton. The op modules import it
# (about 2 s) only when its kernels can run: a torch built with CUDA or ROCm, or the interpreter
# requested before import. A CPU-only torch never has a tensor Triton could launch on.
TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
TORCH_HAS_GPU_BUILD = torch.version.cuda is not None or torch.version.hip is not None
TRITON_AVAILABLE = TRITON_INSTALLED and (TORCH_HAS_GPU_BUILD or os.environ.get("TRITON_INTERPRET", "0") == "1")

_warned_missing_cpp = False


def triton_interpret() -> bool:
    """True when Triton kernels run on CPU tensors through the interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_usable(device: torch.device) -> bool:
    return TRITON_AVAILABLE and (device.type == "cuda" or (device.type == "cpu" and triton_interpret()))


def _cpp_usable(device: torch.device, cpp_ops: tuple[str, ...]) -> bool:
    return device.type == "cpu" and CPP_AVAILABLE and all(hasattr(_C, name) for name in cpp_ops)


def is_traced(t: torch.Tensor) -> bool:
    """True when a compiled kernel must run through its registered op, because something records or
    intercepts the call: torch.compile or export, ``torch.jit.trace``, a dispatch mode (make_fx,
    FlopCounterMode, ...), or a tensor subclass (fake, functional) that holds no data."""
    return (
        torch.compiler.is_compiling()
        or type(t) is not torch.Tensor
        or torch._C._len_torch_dispatch_stack() > 0
        or torch.jit.is_tracing()
    )


def call_op(op, kernels: dict, backend: str, *args):
    """Run one public op on ``backend``. Each public op is registered once: ``op`` is its
    ``torch.library.custom_op``, which takes the backend name as its last argument and whose body is
    ``kernels[backend](*args)``, with one fake for every backend. A traced call (see :func:`is_traced`)
    goes through ``op``; any other calls the kernel directly, because the custom-op layer costs ~40 us of
    Python a call, and ~0.4 ms right after a pass has streamed a volume-sized input through the caches."""
    if is_traced(args[0]):
        return op(*args, backend)
    return kernels[backend](*args)


def resolve_backend(
    op: str, device: torch.device, backend: str = "auto", *, cpp_ops: tuple[str, ...] = ()
) -> str:
    """Return the backend that will run ``op`` on ``device``.

    ``cpp_ops`` names the ``_C`` functions the op needs; an op without a compiled kernel passes ().
    """
    global _warned_missing_cpp
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    requested = backend
    if requested == "auto":
        env = os.environ.get("MEDPRUNER_BACKEND", "auto").strip().lower() or "auto"
        if env not in BACKENDS:
            raise ValueError(f"MEDPRUNER_BACKEND must be one of {BACKENDS}, got {env!r}")
        requested = env

    if requested == "triton":
        if not TRITON_INSTALLED:
            raise RuntimeError(f"{op}: backend='triton' needs the triton package (pip install triton)")
        if not TRITON_AVAILABLE:
            raise RuntimeError(
                f"{op}: backend='triton' with a CPU-only torch runs only in the Triton interpreter: set "
                "TRITON_INTERPRET=1 before importing medpruner_kernels"
            )
        if not _triton_usable(device):
            raise RuntimeError(
                f"{op}: backend='triton' needs CUDA tensors (got {device.type}); on CPU set "
                "TRITON_INTERPRET=1 before importing medpruner_kernels to run the Triton interpreter"
            )
        return "triton"
    if requested == "cpp":
        if not cpp_ops:
            raise RuntimeError(f"{op}: there is no compiled (cpp) kernel for this op; use 'torch' or 'triton'")
        if not CPP_AVAILABLE:
            raise RuntimeError(
                f"{op}: backend='cpp' needs the compiled extension medpruner_kernels._C, which failed "
                f"to import ({CPP_IMPORT_ERROR}); reinstall with `pip install --no-build-isolation .`"
            )
        if device.type != "cpu":
            raise RuntimeError(
                f"{op}: backend='cpp' runs on CPU tensors only (the extension has no CUDA kernels); "
                f"got {device.type} tensors: use 'triton' or 'torch'"
            )
        if not _cpp_usable(device, cpp_ops):
            raise RuntimeError(f"{op}: the compiled extension lacks {cpp_ops}; rebuild it")
        return "cpp"
    if requested == "torch":
        return "torch"

    # auto
    if device.type == "cuda":
        return "triton" if TRITON_AVAILABLE else "torch"
    if cpp_ops and _cpp_usable(device, cpp_ops):
        return "cpp"
    if cpp_ops and not CPP_AVAILABLE and not _warned_missing_cpp:
        _warned_missing_cpp = True
        warnings.warn(
            f"medpruner_kernels._C is not available ({CPP_IMPORT_ERROR}); CPU ops fall back to plain "
            "torch. Reinstall with `pip install --no-build-isolation .` for the OpenMP kernels.",
            RuntimeWarning,
            stacklevel=3,
        )
    return "torch"
