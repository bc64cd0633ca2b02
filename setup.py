"""Build script for the optional compiled extension ``medpruner_kernels._C``.

Install torch first, then this package without build isolation, so the build uses the torch you
already have instead of pulling a (CUDA, several GB) torch into an isolated build environment::

    pip install torch
    pip install --no-build-isolation .

The extension holds CPU (C++17 + OpenMP) kernels only; CUDA tensors run through Triton (or torch).

Environment:
    MEDPRUNER_NO_EXT=1       skip the extension; the package then runs on its Triton/torch paths
    MEDPRUNER_REQUIRE_EXT=1  make a failed extension build an error instead of a warning
"""

import glob
import os
import sys
from concurrent.futures import ThreadPoolExecutor

from setuptools import setup


def _log(msg):
    print(f"[medpruner setup] {msg}", file=sys.stderr)


def _parallel_compile(compile_one_by_one):
    """setuptools' compile, one source per worker (MAX_JOBS, as torch's ninja build reads it, else every core)."""
    jobs = int(os.environ.get("MAX_JOBS", "0")) or os.cpu_count() or 1

    def compile_sources(sources, *args, **kwargs):
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            per_source = pool.map(lambda source: compile_one_by_one([source], *args, **kwargs), sources)
            return [obj for objects in per_source for obj in objects]

    return compile_sources


def _extension_kwargs():
    if os.environ.get("MEDPRUNER_NO_EXT", "0") == "1":
        _log("MEDPRUNER_NO_EXT=1: building without medpruner_kernels._C")
        return {}
    try:
        import torch  # noqa: F401
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        _log(
            "torch is not importable in the build environment; install torch first and use "
            "`pip install --no-build-isolation .`. Building without medpruner_kernels._C."
        )
        return {}

    cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    # No -std flag: torch picks the standard its headers need (C++20 for torch 2.13); our sources are C++17.
    # -g0 overrides the -g of Python's own CFLAGS: debug info for torch's templates was a third of the
    # compile time, and nobody steps through an installed wheel's kernels.
    ext = CppExtension(
        "medpruner_kernels._C",
        cpp_sources,
        extra_compile_args={"cxx": ["-O3", "-fopenmp", "-g0"]},
        extra_link_args=["-fopenmp"],
    )

    class OptionalBuildExtension(BuildExtension):
        """Never fail the install over the extension: the package works through Triton/torch.

        With ninja (torch's default) the sources compile in parallel already. Without it torch falls back
        to setuptools, which compiles them one after another; then each source goes to a thread pool.
        """

        def build_extension(self, ext):
            if not self.use_ninja and len(ext.sources) > 1:
                self.compiler.compile = _parallel_compile(self.compiler.compile)
            super().build_extension(ext)

        def run(self):
            try:
                super().run()
            except Exception as err:  # noqa: BLE001 - any compiler failure means "no extension"
                if os.environ.get("MEDPRUNER_REQUIRE_EXT", "0") == "1":
                    raise
                _log(f"building medpruner_kernels._C failed ({err}); the ops will use Triton/torch")

    _log(f"building medpruner_kernels._C (CPU kernels) from {len(cpp_sources)} sources")
    return {"ext_modules": [ext], "cmdclass": {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}}


setup(**_extension_kwargs())
