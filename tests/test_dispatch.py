"""Backend choice: the compiled extension is CPU-only, so nothing may route CUDA tensors to it; the
deferred-check switch queues CPU value checks as CUDA does."""

import pytest
import torch

from medpruner_kernels import _dispatch, _validation

CUDA = torch.device("cuda")


@pytest.mark.parametrize("cpp_ops", [(), ("iaf_select",)])
def test_auto_never_routes_cuda_tensors_to_the_extension(cpp_ops):
    expected = "triton" if _dispatch.TRITON_AVAILABLE else "torch"
    assert _dispatch.resolve_backend("op", CUDA, "auto", cpp_ops=cpp_ops) == expected


@pytest.mark.skipif(not _dispatch.CPP_AVAILABLE, reason="the compiled extension is not built")
def test_explicit_cpp_on_cuda_says_what_it_needs():
    with pytest.raises(RuntimeError, match="CPU tensors only"):
        _dispatch.resolve_backend("op", CUDA, "cpp", cpp_ops=("iaf_select",))


def test_extension_advertises_no_cuda_kernels():
    if _dispatch.CPP_AVAILABLE:
        assert not hasattr(_dispatch._C, "has_cuda")
    assert not hasattr(_dispatch, "cpp_has_cuda")


def test_deferred_checks_queue_on_cpu_and_raise_at_the_read():
    bad = torch.tensor(True)
    with _validation.deferred_checks():
        _validation.check_or_defer(bad, "op: x is bad")
        _validation.check_or_defer(torch.tensor(False), "op: y is bad")
    assert _validation.pending_error_count() == 2
    with pytest.raises(ValueError, match="x is bad"):
        _validation.raise_pending_errors()
    assert _validation.pending_error_count() == 0
    with pytest.raises(ValueError, match="x is bad"):
        _validation.check_or_defer(bad, "op: x is bad")


def test_deferred_checks_follow_the_environment(monkeypatch):
    monkeypatch.setenv("MEDPRUNER_DEFER_CHECKS", "1")
    assert _validation.checks_deferred(torch.device("cpu"))
    with _validation.deferred_checks(False):
        assert not _validation.checks_deferred(torch.device("cpu"))
    monkeypatch.setenv("MEDPRUNER_DEFER_CHECKS", "0")
    assert not _validation.checks_deferred(torch.device("cpu"))
    assert _validation.checks_deferred(CUDA)


def test_a_copy_without_the_extension_says_so_instead_of_a_circular_import(tmp_path):
    """A source tree never built (the checkout a user runs from) names the missing _C, not Python's
    "partially initialized module (circular import)" text. ``-S``: no site hooks, so the editable
    install's finder cannot supply this checkout's _C."""
    import shutil
    import site
    import subprocess
    import sys
    from pathlib import Path

    import medpruner_kernels

    copy = tmp_path / "medpruner_kernels"
    shutil.copytree(Path(medpruner_kernels.__file__).parent, copy,
                    ignore=shutil.ignore_patterns("_C*.so", "_C*.pyd", "__pycache__"))
    paths = [str(tmp_path), *site.getsitepackages()]
    code = "import medpruner_kernels._dispatch as d; print(d.CPP_AVAILABLE); print(d.CPP_IMPORT_ERROR)"
    done = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, cwd=tmp_path,
                          env={"PYTHONPATH": ":".join(paths), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert done.returncode == 0, done.stderr
    available, error = done.stdout.splitlines()
    assert available == "False"
    assert error.startswith(f"no compiled extension _C in {copy}") and "circular" not in error


def test_each_public_op_is_registered_once_with_the_backend_as_an_argument():
    """One torch.library op per public function, named after it, whose last argument is the backend
    (issue 29): no per-backend copies of a schema or a fake."""
    import importlib

    for module in ("iaf", "iaf_local", "importance", "merge", "nucleus"):
        importlib.import_module(f"medpruner_kernels.{module}")
    names = sorted(n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("medpruner::"))
    public = ["anchor_distances", "attention_importance", "iaf_local_select", "iaf_select", "merge_tokens",
              "nucleus_select"]
    assert names == public
    for name in public:
        schema = getattr(torch.ops.medpruner, name).default._schema
        assert schema.arguments[-1].name == "backend" and str(schema.arguments[-1].type) == "str", schema
