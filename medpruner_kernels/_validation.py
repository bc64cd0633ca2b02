"""Input checks shared by the ops: every bad input is a ValueError/TypeError naming the argument.

Checks that need tensor *values* (NaN, cu_seqlens monotonicity) run eagerly on CPU. On CUDA they
would force a host sync, so they are queued as device flag tensors instead, in the scope of the request
that made them (:func:`error_scope`; the thread's own scope outside any request), and raised by
:func:`raise_pending_errors` at the request's last host read (the adapters and the CLI call it
there). :func:`deferred_checks` (or ``MEDPRUNER_DEFER_CHECKS=1``) makes CPU runs queue them too, so the
CUDA error path can be tested on a machine without a GPU.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
import threading

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
VOLUME_DTYPES = FLOAT_DTYPES + (torch.uint8, torch.int16)

_pending = threading.local()


class ErrorScope:
    """The deferred value checks of one request: per message, the OR of every flag queued with it, so
    nothing is lost however many checks a request queues (memory grows with the distinct messages, a
    bounded set, never with the call count) and no other request sees them."""

    def __init__(self) -> None:
        self._flags: dict[str, torch.Tensor] = {}

    def add(self, message: str, bad: torch.Tensor) -> None:
        flag = bad.reshape(()).to(torch.bool)
        previous = self._flags.get(message)
        self._flags[message] = flag if previous is None else previous | flag

    def __len__(self) -> int:
        return len(self._flags)

    def clear(self) -> None:
        self._flags.clear()

    def raise_pending(self) -> None:
        """Read the flags (one host sync) and raise the first failure, in queueing order, as ValueError."""
        if not self._flags:
            return
        items = list(self._flags.items())
        self._flags.clear()
        flags = torch.stack([flag.to(items[0][1].device) for _, flag in items]).cpu()
        for (message, _), bad in zip(items, flags.tolist(), strict=True):
            if bad:
                raise ValueError(message)


# The scope of the request running in this context (a thread, or an asyncio task: each has its own copy
# of the context), None outside any request: then the thread's own scope collects the checks.
_current_scope: contextvars.ContextVar[ErrorScope | None] = contextvars.ContextVar(
    "medpruner_error_scope", default=None
)


def _scope() -> ErrorScope:
    scope = _current_scope.get()
    if scope is not None:
        return scope
    if not hasattr(_pending, "scope"):
        _pending.scope = ErrorScope()
    return _pending.scope


def open_scope() -> contextvars.Token:
    """Start a request's own :class:`ErrorScope`; pass the token to :func:`close_scope`. Plain calls
    (not a context manager), which a caller Dynamo must skip wraps in ``torch.compiler.disable``
    (not done here: that imports Dynamo, and with it Triton, at ``import medpruner_kernels``)."""
    return _current_scope.set(ErrorScope())


def close_scope(token: contextvars.Token) -> None:
    _current_scope.reset(token)


@contextlib.contextmanager
def error_scope():
    """A request's own deferred checks: within the block, checks queue into a fresh
    :class:`ErrorScope` (yielded), which :func:`raise_pending_errors` reads; on exit the enclosing
    scope is back, untouched by this request's checks. The pipeline opens one per request."""
    token = open_scope()
    try:
        yield _current_scope.get()
    finally:
        close_scope(token)


def _defer(message: str, bad: torch.Tensor) -> None:
    _scope().add(message, bad)


# Whether CPU checks are deferred here: None follows MEDPRUNER_DEFER_CHECKS. A context variable, so that
# a block of one thread or asyncio task does not leak into another that interleaves with it.
_forced: contextvars.ContextVar[bool | None] = contextvars.ContextVar("medpruner_defer_checks", default=None)


@contextlib.contextmanager
def deferred_checks(enabled: bool = True):
    """Within the block, value checks on CPU tensors are queued as on CUDA (this thread or task only),
    to be raised by :func:`raise_pending_errors`. The queue is left as it is on exit."""
    token = _forced.set(enabled)
    try:
        yield
    finally:
        _forced.reset(token)


def checks_deferred(device: torch.device) -> bool:
    """True when a value check on ``device`` is queued instead of raised at once."""
    if device.type != "cpu":
        return True
    # Dynamo cannot trace ContextVar.get; a compiled graph never defers (it cannot raise either).
    forced = None if torch.compiler.is_compiling() else _forced.get()
    if forced is None:
        return os.environ.get("MEDPRUNER_DEFER_CHECKS", "0") == "1"
    return forced


def pending_error_count() -> int:
    """Distinct checks queued and not yet raised in the current scope (the request's, or this
    thread's outside any request)."""
    return len(_scope())


def clear_pending_errors() -> None:
    """Drop the current scope's queued checks without reading them (no host sync)."""
    _scope().clear()


def raise_pending_errors() -> None:
    """Read the current scope's queued validity flags (one host sync) and raise the first failure as
    ValueError."""
    _scope().raise_pending()


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
    check_or_defer(bad, f"{op}: {name} must start at 0, be non-decreasing and end at the number of rows ({total})")
    if not torch.compiler.is_compiling() and checks_deferred(device):
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
