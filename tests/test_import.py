"""`import medpruner_kernels` (and `import medpruner`) must stay cheap: no CUDA initialisation, no
transformers, no adapters until a model-facing name is used."""

import json
import subprocess
import sys

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
