import os
import random

# Triton kernels run on CPU tensors through the interpreter when no GPU is present; this must be set
# before triton (and so medpruner_kernels) is imported.
try:
    import torch as _torch

    _has_cuda = _torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _has_cuda = False
if not _has_cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

try:
    from hypothesis import settings
except ImportError:  # the vLLM environment runs tests/test_vllm.py only, without Hypothesis
    settings = None
if settings is not None:
    # "ci" (the default): the same examples on every run, so a failure reproduces and CI never passes or
    # fails by the draw; "dev": fewer, fresh examples for a quick local run (HYPOTHESIS_PROFILE=dev, with
    # -m "not slow").
    settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
    settings.register_profile("dev", max_examples=10, deadline=None)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

from medpruner_kernels import _dispatch, _validation  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def available_backends(cpp_ops=()):
    """Backends that can run here: torch always, triton on CUDA or under the interpreter, cpp when built."""
    names = ["torch"]
    if _dispatch.TRITON_AVAILABLE and (DEVICE.type == "cuda" or _dispatch.triton_interpret()):
        names.append("triton")
    if cpp_ops and _dispatch.CPP_AVAILABLE and all(hasattr(_dispatch._C, n) for n in cpp_ops):
        names.append("cpp")
    return names


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    random.seed(0)
    yield


@pytest.fixture(autouse=True)
def _drain_deferred_checks():
    """Each test starts with an empty queue of deferred checks and must leave none unread: a check
    still queued at the end is an error that no caller raised."""
    _validation.clear_pending_errors()
    yield
    try:
        _validation.raise_pending_errors()
    except ValueError as err:
        pytest.fail(f"a deferred check was left unraised by the test: {err}")
    finally:
        _validation.clear_pending_errors()


@pytest.fixture
def device():
    return DEVICE
