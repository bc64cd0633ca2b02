"""`import medpruner_kernels` (and `import medpruner`) must stay cheap: no CUDA initialisation, no
transformers, no adapters until a model-facing name is used."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

PROBE = """
import json, sys, torch
import medpruner_kernels, medpruner
print(json.dumps({
    "cuda_initialized": torch.cuda.is_initialized(),
    "transformers": "transformers" in sys.modules,
    "adapters": any(name.startswith("medpruner.adapters") for name in sys.modules),
    "exports": sorted(medpruner_kernels.__all__),
}))
"""


def test_import_is_cheap():
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True)
    state = json.loads(result.stdout.strip().splitlines()[-1])
    assert state["cuda_initialized"] is False
    assert state["transformers"] is False
    assert state["adapters"] is False
    for name in (
        "iaf_select",
        "anchor_distances",
        "nucleus_select",
        "nucleus_indices",
        "attention_importance",
        "merge_tokens",
    ):
        assert name in state["exports"]


def test_lazy_names_resolve():
    import medpruner

    assert callable(medpruner.apply_medpruner)
    assert "apply_medpruner" in dir(medpruner)


TRITON_PROBE = """
import json, sys, torch
import medpruner_kernels
try:
    medpruner_kernels.iaf_select(torch.rand(3, 4), 0.1, backend="triton")
    error = None
except RuntimeError as err:
    error = str(err)
print(json.dumps({"triton_imported": "triton" in sys.modules, "error": error}))
"""


def _probe_triton(interpret: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    result = subprocess.run([sys.executable, "-c", TRITON_PROBE], capture_output=True, text=True, check=True, env=env)
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(torch.version.cuda is not None or torch.version.hip is not None, reason="a CPU-only torch")
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_cpu_only_torch_imports_triton_only_for_the_interpreter():
    plain = _probe_triton(interpret=False)
    assert plain["triton_imported"] is False
    assert "TRITON_INTERPRET=1" in plain["error"]
    interpreted = _probe_triton(interpret=True)
    assert interpreted["triton_imported"] is True
    assert interpreted["error"] is None
