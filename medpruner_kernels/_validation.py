"""Input checks shared by the ops: every bad input is a ValueError/TypeError naming the argument.

Checks that need tensor *values* (NaN, cu_seqlens monotonicity) run eagerly on CPU. On CUDA they
would force a host sync, so they are queued as device flag tensors instead and raised by
:func:`raise_pending_errors` at the caller's last host read of a request (the adapters and the CLI
call it there). :func:`deferred_checks` (or ``MEDPRUNER_DEFER_CHECKS=1``) makes CPU runs queue them
too, so the CUDA error path can be tested on a machine without a GPU.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
VOLUME_DTYPES = FLOAT_DTYPES + (torch.uint8, torch.int16)

_pending = threading.local()
_MAX_PENDING = 256


def _queue() -> list[tuple[str, torch.Tensor]]:
    if not hasattr(_pending, "items"):
        _pending.items = []
    return _pending.items


def _defer(message: str, bad: torch.Tensor) -> None:
    queue = _queue()
    if len(queue) >= _MAX_PENDING:
        # Bounded: a caller that never checks must not leak memory; fold old flags into one.
        folded = torch.stack([flag for _, flag in queue]).any()
        queue[:] = [("an earlier medpruner_kernels call had invalid input", folded)]
    queue.append((message, bad.reshape(())))


@contextlib.contextmanager
def deferred_checks(enabled: bool = True):
    """Within the block, value checks on CPU tensors are queued as on CUDA (this thread only), to be
    raised by :func:`raise_pending_errors`. The queue is left as it is on exit."""
    previous = getattr(_pending, "forced", None)
    _pending.forced = enabled
    try:
        yield
    finally:
        _pending.forced = previous


def checks_deferred(device: torch.device) -> bool:
    """True when a value check on ``device`` is queued instead of raised at once."""
    if device.type != "cpu":
        return True
    forced = getattr(_pending, "forced", None)
    if forced is None:
        return os.environ.get("MEDPRUNER_DEFER_CHECKS", "0") == "1"
    return forced


def pending_error_count() -> int:
    """Checks queued and not yet raised (on this thread)."""
    return len(_queue())


def clear_pending_errors() -> None:
    """Drop the queued checks without reading them (no host sync)."""
    _queue().clear()


def raise_pending_errors() -> None:
    """Read the queued CUDA validity flags (one host sync) and raise the first failure as ValueError."""
    queue = _queue()
    if not queue:
        return
    items = list(queue)
    queue.clear()
    flags = torch.stack([flag.to(torch.bool) for _, flag in items]).cpu()
    for (message, _), bad in zip(items, flags.tolist(), strict=True):
        if bad:
            raise ValueError(message)


def check_or_defer(bad: torch.Tensor, message: str) -> None:
    """``bad`` is a 0-d bool tensor; raise now on CPU, queue the flag on CUDA (or under
    :func:`deferred_checks`). Inside a compiled graph the check is skipped: a graph cannot raise."""
    if torch.compiler.is_compiling():
        return
    if checks_deferred(bad.device):
        _defer(message, bad)
    elif bool(bad):
        raise ValueError(message)


def check_tensor(op: str, name: str, t, dtypes: tuple[torch.dtype, ...]) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{op}: {name} has unsupported dtype {t.dtype}; expected one of {allowed}")


def check_count_tensor(op: str, name: str, t, length: int, per: str, device: torch.device, on: str) -> None:
    """``t``: an int32/int64 tensor of shape ``[length]`` (one count per ``per``) on ``device`` (that of
    the argument named ``on``); TypeError/ValueError naming ``name`` otherwise."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be None or an int32/int64 tensor, got {type(t).__name__}")
    if t.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{op}: {name} must be int32 or int64, got {t.dtype}")
    if t.shape != (length,):
        raise ValueError(f"{op}: {name} must have shape [{length}] (one per {per}), got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{op}: {name} is on {t.device} but {on} is on {device}")


def check_finite(op: str, name: str, t: torch.Tensor) -> None:
    if t.dtype.is_floating_point and t.numel() > 0:
        # min/max propagate NaN and expose +-Inf in one reduction without allocating a mask
        # (torch.isfinite(t).all() is ~20x slower on a large CPU volume).
        low, high = torch.aminmax(t)
        check_or_defer(~(torch.isfinite(low) & torch.isfinite(high)), f"{op}: {name} contains NaN or Inf")


def check_cu_structure(op: str, cu_seqlens, device: torch.device, name: str = "cu_seqlens") -> None:
    """The checks on a ``[B+1]`` offsets tensor that read no values (so none of them syncs on CUDA)."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor of int32, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{op}: {name} must be int32 (or int64), got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"{op}: {name} must be 1-D with B+1 >= 2 entries, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != device:
        raise ValueError(f"{op}: {name} is on {cu_seqlens.device} but the input is on {device}")


def check_cu_seqlens(op: str, cu_seqlens, total: int, device: torch.device, name: str = "cu_seqlens"):
    """Validate a ``[B+1]`` int32 offsets tensor: starts at 0, non-decreasing, ends at ``total``.
    ``None`` means one segment of all ``total`` rows."""
    if cu_seqlens is None:
        return torch.tensor([0, total], dtype=torch.int32, device=device)
    check_cu_structure(op, cu_seqlens, device, name)
    cu = cu_seqlens.to(torch.int64)
    bad = (cu[0] != 0) | (cu[-1] != total) | (cu[1:] < cu[:-1]).any()
    check_or_defer(
        bad, f"{op}: {name} must start at 0, be non-decreasing and end at the number of rows ({total})"
    )
    if checks_deferred(device) and not torch.compiler.is_compiling():
        # The check above is only queued: until it is raised, the kernels must not read or write out
        # of bounds (on CUDA that is a sticky illegal-address error), so they get offsets forced into
        # shape, without a host read. Valid offsets pass through unchanged.
        cu = torch.cummax(cu.clamp(0, total), dim=0).values
        cu[0] = 0
        cu[-1] = total
    return cu.to(torch.int32).contiguous()


def check_gamma(op: str, gamma) -> float:
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)):
        raise TypeError(f"{op}: gamma must be a Python float, got {type(gamma).__name__}")
    gamma = float(gamma)
    if gamma != gamma:
        raise ValueError(f"{op}: gamma must not be NaN (a negative gamma keeps every slice)")
    return gamma


def check_tau(op: str | None, tau) -> float:
    """The one rule for a scalar ``tau`` (DINS nucleus mass), shared by the API and the command line:
    a real number, finite and > 0; ``tau >= 1`` keeps every token (pruning off). Returns it as a float;
    TypeError/ValueError naming ``op`` (when given) otherwise. (A per-slice tau tensor is checked by
    value in the op.)"""
    prefix = f"{op}: " if op else ""
    if isinstance(tau, bool) or not isinstance(tau, (int, float)):
        raise TypeError(f"{prefix}tau must be a float, got {type(tau).__name__}")
    value = float(tau)
    if not (math.isfinite(value) and value > 0.0):
        raise ValueError(f"{prefix}tau must be a finite number > 0 (tau >= 1 keeps every token), got {tau!r}")
    return value
