"""Let a CUDA build of torchvision import beside a CPU torch (the CPU test setup of the vLLM plugin).

vLLM's Qwen-VL code imports Hugging Face's torchvision image and video processors, and on x86-64 PyPI
has only CUDA builds of torchvision. Beside a CPU torch their compiled ops (``_C``) cannot load;
torchvision then skips registering those ops but still registers fake kernels for ``torchvision::nms``
and ``torchvision::qnms``, which fails, so ``import torchvision`` fails. Declaring those two schemas
(no kernel) first lets the pure-Python transforms the processors use import; calling ``nms`` itself
still raises, as it would without the ops.

vLLM imports torchvision in every process it starts (model inspection runs in a subprocess, before
any plugin loads), so the fix has to live in the environment: ``python -m medpruner.vllm._torchvision``
writes a ``.pth`` file into the running interpreter's site-packages that installs an import hook; the
hook acts only when ``torchvision`` is first imported. Nothing is needed where torchvision's ops load
(a CUDA torch, or a CPU torchvision build).
"""

from __future__ import annotations

import os
import sys
import sysconfig

PTH_NAME = "medpruner-torchvision-cpu.pth"

# Runs from the .pth line: keep it self-contained (no medpruner import at interpreter start).
HOOK_SOURCE = '''
class _MedPrunerTorchvisionHook:
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name != "torchvision":
            return None
        sys.meta_path.remove(cls)
        import importlib.util, os, torch
        spec = importlib.util.find_spec("torchvision")
        if spec is None or spec.origin is None or hasattr(torch.ops.torchvision, "nms"):
            return None
        try:
            torch.ops.load_library(os.path.join(os.path.dirname(spec.origin), "_C.so"))
        except (OSError, RuntimeError):
            schema = "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"
            for op in ("nms", "qnms"):
                torch.library.define("torchvision::" + op, schema)
        return None
sys.meta_path.insert(0, _MedPrunerTorchvisionHook)
'''


def install(site_packages: str | None = None) -> str:
    """Write the hook's ``.pth`` into ``site_packages`` (default: this interpreter's purelib);
    returns its path."""
    directory = site_packages or sysconfig.get_paths()["purelib"]
    path = os.path.join(directory, PTH_NAME)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(f"import sys; exec({HOOK_SOURCE!r})\n")
    return path


if __name__ == "__main__":
    print(install(sys.argv[1] if len(sys.argv) > 1 else None))
