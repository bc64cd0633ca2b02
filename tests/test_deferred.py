"""Value checks that CUDA defers (no host sync) surface as ValueError at the request's read.

``deferred_checks()`` makes CPU runs take the CUDA path: the check is queued, the op still runs (on
offsets forced into bounds, so no kernel reads or writes out of range), and
``raise_pending_errors()`` raises the queued error naming the argument."""

import pytest
import torch

import medpruner_kernels as mk
from medpruner_kernels import _validation
from tests.conftest import available_backends

BAD_OFFSETS = {
    "decreasing": [0, 5, 3, 8],
    "ends_short": [0, 3, 6],
    "ends_past_the_rows": [0, 3, 12],
    "starts_negative": [-2, 3, 8],
}

OPS = {
    "iaf_select": (("iaf_select",), lambda cu, b: mk.iaf_select(torch.rand(8, 4, 4), 0.1, cu_seqlens=cu, backend=b)),
    "nucleus_select": (
        ("nucleus_select_cpu",),
        lambda cu, b: mk.nucleus_select(torch.rand(8), 0.9, cu_seqlens=cu, backend=b),
    ),
    "attention_importance": (
        ("attention_importance",),
        lambda cu, b: mk.attention_importance(torch.randn(8, 2, 8), torch.randn(8, 2, 8), cu_seqlens=cu, backend=b),
    ),
    "merge_tokens": (
        ("merge_tokens",),
        lambda cu, b: mk.merge_tokens(
            torch.randn(8, 4), torch.randn(8, 4), torch.rand(8) > 0.5, cu_seqlens=cu, backend=b
        ),
    ),
}


def _cases():
    for op, (cpp_ops, _) in OPS.items():
        for backend in available_backends(cpp_ops):
            for kind in BAD_OFFSETS:
                yield pytest.param(op, backend, kind, id=f"{op}-{backend}-{kind}")


@pytest.mark.parametrize("op, backend, kind", list(_cases()))
def test_bad_offsets_raise_at_the_read(op, backend, kind):
    run = OPS[op][1]
    cu = torch.tensor(BAD_OFFSETS[kind], dtype=torch.int32)
    with _validation.deferred_checks():
        run(cu, backend)
    assert _validation.pending_error_count() >= 1
    with pytest.raises(ValueError, match=f"{op}: cu_seqlens must start at 0"):
        mk.raise_pending_errors()


@pytest.mark.parametrize("backend", available_backends(("iaf_select",)))
def test_nan_volume_raises_at_the_read(backend):
    volume = torch.rand(6, 4, 4)
    volume[3, 1, 2] = float("nan")
    with _validation.deferred_checks():
        try:
            mk.iaf_select(volume, 0.1, backend=backend)
        except ValueError as err:
            # The compiled kernel finds NaN inside its own pass and raises there, before returning.
            assert "NaN" in str(err)
            return
    with pytest.raises(ValueError, match="iaf_select: volume contains NaN"):
        mk.raise_pending_errors()


def test_valid_offsets_pass_through_unchanged():
    cu = torch.tensor([0, 3, 3, 8], dtype=torch.int32)
    with _validation.deferred_checks():
        out = _validation.check_cu_seqlens("op", cu, 8, cu.device)
    assert torch.equal(out, cu)
    mk.raise_pending_errors()


# ------------------------------------------------------------------------------ request scopes
def _bad_volume(value=float("nan")):
    volume = torch.rand(6, 4, 4)
    volume[3, 1, 1] = value
    return volume


def test_nothing_is_lost_past_a_count():
    """Many queued checks keep every failing one with its own message (no folding past a count)."""
    with _validation.deferred_checks(), _validation.error_scope():
        for _ in range(600):
            mk.iaf_select(torch.rand(6, 4, 4), 0.1, backend="torch")
        mk.nucleus_select(torch.tensor([[1.0, float("nan")]]), 0.9, backend="torch")
        for _ in range(600):
            mk.iaf_select(torch.rand(6, 4, 4), 0.1, backend="torch")
        assert _validation.pending_error_count() <= 4
        with pytest.raises(ValueError, match="nucleus_select: scores"):
            mk.raise_pending_errors()


def test_a_request_never_sees_another_requests_errors():
    with _validation.deferred_checks(), _validation.error_scope() as outer:
        mk.iaf_select(_bad_volume(), 0.1, backend="torch")
        with _validation.error_scope() as inner:
            mk.iaf_select(torch.rand(6, 4, 4), 0.1, backend="torch")
            mk.raise_pending_errors()  # the inner request is clean
            assert len(inner) == 0
        assert len(outer) == 1
        with pytest.raises(ValueError, match="iaf_select: volume contains NaN"):
            mk.raise_pending_errors()


def test_scopes_are_per_thread_and_per_task():
    import asyncio
    import threading

    raised = {}

    async def request(name, bad):
        with _validation.deferred_checks(), _validation.error_scope():
            mk.iaf_select(_bad_volume() if bad else torch.rand(6, 4, 4), 0.1, backend="torch")
            await asyncio.sleep(0)  # the other task queues its checks here
            try:
                mk.raise_pending_errors()
                raised[name] = None
            except ValueError as error:
                raised[name] = str(error)

    async def both():
        await asyncio.gather(request("task-bad", True), request("task-good", False))

    asyncio.run(both())
    worker = threading.Thread(target=lambda: asyncio.run(request("thread-good", False)))
    with _validation.deferred_checks(), _validation.error_scope():
        mk.iaf_select(_bad_volume(), 0.1, backend="torch")
        worker.start()
        worker.join()
        with pytest.raises(ValueError, match="NaN"):
            mk.raise_pending_errors()
    assert "NaN" in raised["task-bad"]
    assert raised["task-good"] is None and raised["thread-good"] is None
