"""Build script for the optional compiled extension ``medpruner_kernels._C``.

Install torch first, then this package without build isolation, so the build uses the torch you
already have instead of pulling a (CUDA, several GB) torch into an isolated build environment::

    pip install torch
    pip install --no-build-isolation .

Environment:
    MEDPRUNER_BUILD_CUDA=1   also compile csrc/*.cu (needs nvcc and a CUDA build of torch)
    MEDPRUNER_BUILD_CUDA=0   never compile CUDA sources
    MEDPRUNER_NO_EXT=1       skip the extension; the package then runs on its Triton/torch paths
"""

import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _log(msg):
    print(f"[medpruner setup] {msg}", file=sys.stderr)


def _extension_kwargs():
    if os.environ.get("MEDPRUNER_NO_EXT", "0") == "1":
        _log("MEDPRUNER_NO_EXT=1: building without medpruner_kernels._C")
        return {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        _log(
            "torch is not importable in the build environment; install torch first and use "
            "`pip install --no-build-isolation .`. Building without medpruner_kernels._C."
        )
        return {}

    cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    flag = os.environ.get("MEDPRUNER_BUILD_CUDA")
    if flag is None:
        build_cuda = torch.version.cuda is not None and CUDA_HOME is not None and bool(cuda_sources)
    else:
        build_cuda = flag == "1"
    if build_cuda and (torch.version.cuda is None or CUDA_HOME is None):
        raise RuntimeError(
            "MEDPRUNER_BUILD_CUDA=1 needs a CUDA build of torch and nvcc (CUDA_HOME); "
            f"found torch {torch.__version__} (cuda={torch.version.cuda}), CUDA_HOME={CUDA_HOME}"
        )

    # No -std flag: torch picks the standard its headers need (C++20 for torch 2.13); our sources are C++17.
    cxx_flags = ["-O3", "-fopenmp"]
    define_macros = []
    if build_cuda:
        define_macros.append(("MEDPRUNER_WITH_CUDA", None))
        ext = CUDAExtension(
            "medpruner_kernels._C",
            cpp_sources + cuda_sources,
            define_macros=define_macros,
            extra_compile_args={
                "cxx": cxx_flags,
                "nvcc": ["-O3", "--use_fast_math", "-lineinfo"],
            },
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension(
            "medpruner_kernels._C",
            cpp_sources,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )

    class OptionalBuildExtension(BuildExtension):
        """Never fail the install over the extension: the package works through Triton/torch."""

        def run(self):
            try:
                super().run()
            except Exception as err:  # noqa: BLE001 - any compiler failure means "no extension"
                if os.environ.get("MEDPRUNER_REQUIRE_EXT", "0") == "1":
                    raise
                _log(f"building medpruner_kernels._C failed ({err}); the ops will use Triton/torch")

    _log(f"building medpruner_kernels._C (cuda={build_cuda}) from {len(cpp_sources + cuda_sources)} sources")
    return {"ext_modules": [ext], "cmdclass": {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}}


setup(**_extension_kwargs())
