"""Codegen check: every Triton launch the ops make for the supported models, compiled for sm_80 and sm_90
on this machine (no GPU needed), with registers, spills, shared memory and the hot loops' load widths.

    python bench/codegen.py [--json PATH] [--jobs N] [--targets 80 90] [--quick]

1. Record. The public ops run under the Triton interpreter with launch recording hooked into the
   interpreter's launch entry (``InterpretedFunction.run``), so whatever kernels the op files define are
   seen, not a list kept here. Each launch is bound with Triton's own JIT binder (``native_specialize_impl``
   with the CUDA backend): a 1 becomes a constexpr, multiples of 16 (integers and pointers) get
   divisibility hints, integers past 2**31 become i64, exactly as a GPU launch specialises them. Ops pick
   their CUDA tile sizes here through ``_triton_common.gpu_launch_configs``.
   Inputs are small stand-ins for the model shapes (see ``cases``): the same dtypes, head counts and head
   dims, the same strides (views over a wider row, as the fused qkv projection gives), slice sizes and
   tokens per slice as the models produce, and counts (tokens, slices) kept in the class of the real ones
   (multiples of 16, never 1, within int32). The compile key then equals the real launch's key; only
   grids differ, which the compiler never sees. Launches are deduplicated by that key, cases with equal
   inputs are recorded once, and the IAF stand-ins' keys are checked against real 384^2/512^2 volumes
   recorded without running the kernels (too slow to interpret). ``--quick`` (the CI test) records one
   IAF volume per dtype instead of two: the same launches.
2. Compile. A pool of ``--jobs`` processes (spawned, so triton is imported with the JIT, not the
   interpreter) compiles each launch as soon as the recorder first sees it: they run
   ``triton.compile(ASTSource(...), target=GPUTarget("cuda", sm, 32))``: the wheel's ptxas builds the
   cubin; ``cuobjdump --dump-resource-usage`` gives registers, stack (spills), local and shared memory;
   ``nvdisasm -c`` gives the SASS, whose loop bodies (code between a label and a backward branch to it)
   give the global-load widths of the hot loops (``LDG.E.128`` / ``LDGSTS.E.128`` = 16 bytes).
3. Report: a JSON (default ``bench/results/codegen-<date>.json``) and markdown tables on stdout. The exit
   status is 1 on a compile error, a stack/local spill beyond ``STACK_ALLOWANCE`` or a kernel that no
   case launched.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGETS = (80, 90)
# Stack bytes tolerated per (kernel, sm); everything else: 0. Empty: every known spill is either fixed
# or meant to fail this check until it is (issue 13: _assign_kernel's 8 bytes on sm_90).
STACK_ALLOWANCE: dict[tuple[str, int], int] = {}
OP_MODULES = ("iaf", "iaf_local", "nucleus", "importance", "merge")

# (name, heads, head dim, row stride of q/k in elements, LLM hidden size, tokens per slice after the
# vision merger for 384^2 and 512^2 slices). Qwen reads q/k as views of the fused qkv projection
# [N, 3 * H * Dh]; SigLIP's q_proj output is [N, H * Dh], read as is (paper mode: 4096 patches a slice).
MODELS = (
    ("qwen3-vl-8b", 16, 72, 3 * 16 * 72, 4096, (144, 256)),
    ("qwen2.5-vl-7b", 16, 80, 3 * 16 * 80, 3584, (196, 324)),
    ("medgemma-4b", 16, 72, 16 * 72, 2560, (256, 256)),
)
# Stand-in counts: slices of a volume and segments of a batch (real: 64..1024 slices); a multiple of 16
# as the real counts are.
STAND_IN_SLICES = 32
# IAF reads a slice as one row of H * W columns. Interpreting 384^2 or 512^2 slices takes minutes a
# volume; a 128^2 slice (16384 columns, a multiple of 16 like 147456 and 262144) gives the same launch
# key while the column tiling saturates (iaf.py at e0ceca1: at most MAX_TILES = 64 tiles of >= 256
# columns, reached from 16384 columns). An IAF whose constexprs follow the slice size past that must be
# recorded at the real sizes: change this side to 384 and 512 (slow, minutes).
IAF_STAND_IN_SIDE = 128
# Checked on every run: the stand-ins' IAF keys must equal those of real 384^2/512^2 volumes of 64 and
# 256 slices, recorded without running the kernels (see _recording). 64^2 slices fail it (4 band tiles
# of iaf.BLOCK columns, no multiple of 16, unlike the real 144 and 256). --quick (the CI test) records
# one volume of 16 slices (few keeps: the scan's row requests run) instead of two; the launch keys
# follow shapes only, so both volumes give the same ones.
IAF_REAL_SIDES = (384, 512)
IAF_REAL_SLICES = (64, 256)
STAND_IN_SEGMENTS = 4
MERGE_STAND_IN_HIDDEN = 256


# ------------------------------------------------------------------------------------------ record
def _dtypes():
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _rows_view(rows, heads, head_dim, row_stride, dtype):
    """``[rows, heads, head_dim]`` with row stride ``row_stride`` (a q/k view of a wider projection)."""
    import torch

    storage = torch.randn(rows, row_stride).to(dtype)
    return storage[:, : heads * head_dim].view(rows, heads, head_dim)


def _case_importance(model, dtype):
    import torch

    from medpruner_kernels import attention_importance

    _, heads, head_dim, row_stride, _, _ = model
    # One 16-token segment: every program of the 16 heads is interpreted, so the stand-in stays short.
    n = 16
    q = _rows_view(n, heads, head_dim, row_stride, dtype)
    k = _rows_view(n, heads, head_dim, row_stride, dtype)
    cu = torch.tensor([0, n], dtype=torch.int32)
    group = 1 if model[0].startswith("medgemma") else 4
    attention_importance(q, k, cu_seqlens=cu, group=group, backend="triton")


def _case_nucleus(tokens):
    import torch

    from medpruner_kernels import nucleus_indices, nucleus_select

    temperature = 2.0
    scores = torch.rand(STAND_IN_SEGMENTS * tokens) * 3
    cu = torch.arange(STAND_IN_SEGMENTS + 1, dtype=torch.int32) * tokens
    for fn in (nucleus_select, nucleus_indices):
        fn(scores, 0.9, temperature=temperature, cu_seqlens=cu, max_seqlen=tokens, backend="triton")
    nucleus_select(scores.view(STAND_IN_SEGMENTS, tokens), 0.9, backend="triton")
    # the budget mode (HF budget= and the vLLM plugin): a fixed count per slice, the FIXED_COUNT variant
    counts = torch.full((STAND_IN_SEGMENTS,), max(1, tokens // 4), dtype=torch.int32)
    nucleus_select(scores, 0.9, temperature=temperature, cu_seqlens=cu, max_seqlen=tokens, counts=counts,
                   backend="triton")


def _case_merge(model, tokens, dtype):
    import torch

    from medpruner_kernels import merge_tokens

    _, _, head_dim, _, hidden, _ = model
    # One slice of the real token count; features narrowed to MERGE_STAND_IN_HIDDEN columns (a
    # multiple of 16, as every real hidden size is), the interpreter's cost growing with both.
    x = torch.randn(tokens, hidden)[:, :MERGE_STAND_IN_HIDDEN].contiguous().to(dtype)
    keys = torch.randn(tokens, head_dim)  # head-averaged float32 keys, as the adapters pass them
    keep = torch.rand(tokens) < 0.1
    cu = torch.tensor([0, tokens], dtype=torch.int32)
    merge_tokens(x, keys, keep, cu_seqlens=cu, backend="triton")


def _case_iaf(dtype, quick):
    import torch

    from medpruner_kernels import anchor_distances, iaf_select

    # Random slices keep almost every slice; a nearly constant volume keeps few (runs longer than the
    # band need distances to an older anchor: 16 slices are enough for that, 32 give longer runs).
    side, few_slices = IAF_STAND_IN_SIDE, STAND_IN_SLICES // 2 if quick else STAND_IN_SLICES
    many = torch.rand(STAND_IN_SLICES // 2, side, side).to(dtype)
    few = (torch.full((few_slices, side, side), 0.5) + 1e-3 * torch.rand(few_slices, 1, 1)).to(dtype)
    for volume in (few,) if quick else (many, few):
        keep = iaf_select(volume, 0.05, backend="triton")
        anchor_distances(volume, keep, backend="triton")


def _case_iaf_real(dtype):
    """Real volume sizes, for their launch keys only (recorded without running the kernels): the kept
    mask is given, as the kernels that would compute it do not run."""
    import torch

    from medpruner_kernels import anchor_distances, iaf_select

    for side in IAF_REAL_SIDES:
        for slices in IAF_REAL_SLICES:
            volume = torch.full((slices, side, side), 0.5, dtype=dtype)
            iaf_select(volume, 0.05, backend="triton")
            anchor_distances(volume, torch.arange(slices) % 3 == 0, backend="triton")


# Local IAF's block: one merged patch of Qwen3-VL pixel rows (2x2 patches of 3 x 2 x 16 x 16 values);
# a 384^2 slice holds 144 of them. The launch keys follow the sizes' divisibility by 16 only, so 16
# blocks a slice stand in for 144 (checked against the real size, recorded without running).
IAF_LOCAL_BLOCK = 4 * 3 * 2 * 16 * 16
IAF_LOCAL_STAND_IN_BLOCKS = 16
IAF_LOCAL_REAL_BLOCKS = 144


def _case_iaf_local(dtype, quick):
    import torch

    from medpruner_kernels import iaf_local_select

    cols = IAF_LOCAL_STAND_IN_BLOCKS * IAF_LOCAL_BLOCK
    many = torch.rand(STAND_IN_SLICES // 4, cols).to(dtype)
    few = (torch.full((STAND_IN_SLICES // 2, cols), 0.5) + 1e-3 * torch.rand(STAND_IN_SLICES // 2, 1)).to(dtype)
    for volume in (few,) if quick else (many, few):
        iaf_local_select(volume, 0.05, block=IAF_LOCAL_BLOCK, backend="triton")


def _case_iaf_local_real(dtype):
    import torch

    from medpruner_kernels import iaf_local_select

    volume = torch.full((IAF_REAL_SLICES[0], IAF_LOCAL_REAL_BLOCKS * IAF_LOCAL_BLOCK), 0.5, dtype=dtype)
    iaf_local_select(volume, 0.05, block=IAF_LOCAL_BLOCK, backend="triton")


def cases(quick=False):
    """(op, description, thunk, real-shape thunk or None) for every model shape and dtype. Cases whose
    inputs equal an earlier case's (MedGemma's slices and head dim are Qwen3-VL's 256-token ones for
    nucleus and merge) are recorded once: equal inputs make equal launches."""
    out, seen = [], set()

    def add(op, description, inputs, thunk, real=None):
        if (op, inputs) not in seen:
            seen.add((op, inputs))
            out.append((op, description, thunk, real))

    for model in MODELS:
        _, heads, head_dim, row_stride, _, slice_tokens = model
        for dname, dtype in _dtypes().items():
            inputs = (heads, head_dim, row_stride, model[0].startswith("medgemma"), dname)
            add("importance", f"{model[0]} {dname}", inputs, lambda m=model, d=dtype: _case_importance(m, d))
        for tokens in sorted(set(slice_tokens)):
            add("nucleus", f"{model[0]} T={tokens}", (tokens,), lambda t=tokens: _case_nucleus(t))
            for dname, dtype in _dtypes().items():
                add(
                    "merge",
                    f"{model[0]} T={tokens} {dname}",
                    (tokens, head_dim, model[4] >= MERGE_STAND_IN_HIDDEN, dname),
                    lambda m=model, t=tokens, d=dtype: _case_merge(m, t, d),
                )
    for dname, dtype in _dtypes().items():
        add(
            "iaf",
            f"{IAF_STAND_IN_SIDE}^2 for 384^2/512^2 {dname}",
            (dname,),
            lambda d=dtype: _case_iaf(d, quick),
            lambda d=dtype: _case_iaf_real(d),
        )
        add(
            "iaf_local",
            f"{IAF_LOCAL_STAND_IN_BLOCKS} for {IAF_LOCAL_REAL_BLOCKS} Qwen3-VL merged patches a slice {dname}",
            (dname,),
            lambda d=dtype: _case_iaf_local(d, quick),
            lambda d=dtype: _case_iaf_local_real(d),
        )
    return out


def _jsonable(value):
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return {"repr": repr(value)}


class _Binder:
    """Triton's JIT binder for a kernel, with the CUDA backend's specialisation."""

    def __init__(self):
        from triton.backends.compiler import GPUTarget
        from triton.backends.nvidia.compiler import CUDABackend

        self.backend = CUDABackend(GPUTarget("cuda", 90, 32))
        self.cache = {}

    def describe(self, interpreted, args, kwargs):
        from triton.runtime.jit import JITFunction, create_function_from_signature

        fn = interpreted.fn
        if fn not in self.cache:
            options = {k: interpreted.kwargs.get(k) for k in ("do_not_specialize", "do_not_specialize_on_alignment")}
            jit = JITFunction(fn, **options)
            self.cache[fn] = (jit, create_function_from_signature(jit.signature, jit.params, self.backend))
        jit, binder = self.cache[fn]
        bound, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = jit._pack_args(self.backend, kwargs, bound, specialization, options)
        return {
            "kernel": fn.__name__,
            "module": fn.__module__,
            "signature": signature,
            "constexprs": [[list(path), _jsonable(value)] for path, value in constexprs.items()],
            "attrs": [[list(path), value] for path, value in attrs.items()],
            "num_warps": options.num_warps,
            "num_stages": options.num_stages,
        }


@contextlib.contextmanager
def _recording(binder, sink, execute=True):
    """Record launches into ``sink``; ``execute=False`` skips the kernels themselves, for launch keys of
    shapes too large to interpret: their tensor arguments are zeroed instead, so that host checks that
    read outputs (NaN checks) see finite values. Those keys are only trusted where an executed stand-in
    gives the same ones (``record_launches``)."""
    import torch
    from triton.runtime.interpreter import InterpretedFunction

    original = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        if not warmup:
            sink.append(binder.describe(self, args, kwargs))
        if execute:
            return original(self, *args, grid=grid, warmup=warmup, **kwargs)
        for arg in args:
            if isinstance(arg, torch.Tensor):
                arg.zero_()
        return None

    InterpretedFunction.run = run
    try:
        yield
    finally:
        InterpretedFunction.run = original


def _kernels_defined():
    """Module-level jit functions of the op files that no other jit function calls: the launchable ones."""
    from triton.runtime.interpreter import InterpretedFunction

    jitted = {}
    for name in OP_MODULES:
        module = importlib.import_module(f"medpruner_kernels.{name}")
        for value in vars(module).values():
            if isinstance(value, InterpretedFunction) and value.fn.__module__ == module.__name__:
                jitted[value.fn.__name__] = inspect.getsource(value.fn)
    called = {f for f in jitted for g, src in jitted.items() if g != f and re.search(rf"\b{f}\s*\(", src)}
    return sorted(set(jitted) - called)


def _launch_key(launch) -> str:
    return json.dumps(launch, sort_keys=True)


def _record(binder, thunk, execute=True):
    import torch

    from medpruner_kernels._triton_common import gpu_launch_configs

    sink = []
    torch.manual_seed(0)
    with _recording(binder, sink, execute), gpu_launch_configs(), torch.no_grad():
        thunk()
    return sink


def record_launches(quick=False, on_new=None):
    """Run every case under the interpreter; the deduplicated launches, each with the cases that made
    it, and the errors (a case that raised, or a stand-in whose launch keys differ from its real shape's).
    ``on_new(launch)`` is called on each launch when first seen."""
    binder, launches, errors = _Binder(), {}, []
    for op, description, thunk, real in cases(quick):
        try:
            sink = _record(binder, thunk)
            if real is not None:
                wanted = {_launch_key(x) for x in _record(binder, real, execute=False)}
                got = {_launch_key(x) for x in sink}
                if got != wanted:
                    names = sorted({x["kernel"] for x in map(json.loads, got ^ wanted)})
                    errors.append(f"{op} {description}: stand-in launch keys differ from the real shape's: {names}")
        except Exception as err:  # reported as a failure, the other cases still run
            errors.append(f"{op} {description}: {type(err).__name__}: {err}")
            continue
        for launch in sink:
            key = _launch_key(launch)
            if key not in launches:
                launches[key] = {**launch, "cases": []}
                if on_new is not None:
                    on_new(launches[key])
            entry = launches[key]
            if f"{op} {description}" not in entry["cases"]:
                entry["cases"].append(f"{op} {description}")
    return list(launches.values()), errors


# ----------------------------------------------------------------------------------------- compile
_LOAD = re.compile(r"\b(LDG|LDGSTS)(\.[A-Z0-9_.]+)?\b")
_WIDTH = {"U8": 1, "S8": 1, "U16": 2, "S16": 2, "64": 8, "128": 16}


def _load_bytes(op: str) -> int:
    parts = op.split(".")
    for part in reversed(parts):
        if part in _WIDTH:
            return _WIDTH[part]
    return 4


def analyse_sass(sass: str) -> dict:
    """Global loads of the whole kernel and of its loop bodies (a label up to a backward branch to it)."""
    lines = sass.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"^(\.L_x_\d+):", line))}
    in_loop = [False] * len(lines)
    for i, line in enumerate(lines):
        m = re.search(r"BRA\s+`?\(?(\.L_x_\d+)\)?", line)
        if m and m.group(1) in labels and labels[m.group(1)] < i:
            for j in range(labels[m.group(1)], i + 1):
                in_loop[j] = True
    every, looped = Counter(), Counter()
    for i, line in enumerate(lines):
        m = _LOAD.search(line)
        if m and "EXIT" not in line:
            op = m.group(1) + (m.group(2) or "")
            every[op] += 1
            if in_loop[i]:
                looped[op] += 1
    return {
        "global_loads": dict(every),
        "loop_global_loads": dict(looped),
        "loop_load_bytes": sorted({_load_bytes(op) for op in looped}),
        "load_bytes": sorted({_load_bytes(op) for op in every}),
    }


def _tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def _compile_one(launch, target, workdir):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    jit = getattr(importlib.import_module(launch["module"]), launch["kernel"])
    constexprs = {tuple(path): value for path, value in launch["constexprs"]}
    attrs = {tuple(path): value for path, value in launch["attrs"]}
    source = ASTSource(jit, launch["signature"], constexprs, attrs)
    options = {"num_warps": launch["num_warps"], "num_stages": launch["num_stages"]}
    compiled = triton.compile(source, target=GPUTarget("cuda", target, 32), options=options)
    cubin = Path(workdir) / f"{launch['kernel']}-{target}-{os.getpid()}.cubin"
    cubin.write_bytes(compiled.asm["cubin"])
    usage = subprocess.run(
        [_tool("cuobjdump"), "--dump-resource-usage", str(cubin)], capture_output=True, text=True, check=True
    ).stdout
    fields = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage.split("Function", 1)[-1]))
    sass = subprocess.run([_tool("nvdisasm"), "-c", str(cubin)], capture_output=True, text=True, check=True).stdout
    return {
        "registers": int(fields["REG"]),
        "stack_bytes": int(fields["STACK"]),
        "local_bytes": int(fields["LOCAL"]),
        "static_shared_bytes": int(fields["SHARED"]),
        "shared_bytes": int(compiled.metadata.shared),
        **analyse_sass(sass),
    }


def _jit_worker_init() -> None:
    """A compile process: triton imported without TRITON_INTERPRET, so ``triton.jit`` makes JIT
    functions; the flag is set afterwards only so that the op modules define their kernels on this
    CPU-only torch."""
    os.environ.pop("TRITON_INTERPRET", None)
    import triton
    import triton.language  # noqa: F401
    from triton.compiler import code_generator  # noqa: F401

    triton.knobs.runtime.__dict__["interpret"] = False
    os.environ["TRITON_INTERPRET"] = "1"


def _cpu_seconds() -> float:
    import resource

    return sum(
        usage.ru_utime + usage.ru_stime
        for usage in (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN))
    )


def _compile_task(launch, target):
    start = _cpu_seconds()
    with tempfile.TemporaryDirectory() as workdir:
        try:
            result = _compile_one(launch, target, workdir)
        except Exception as err:  # a compile error is a result to report, not a crash
            result = {"error": f"{type(err).__name__}: {err}"[:2000]}
    # CPU seconds of this compile (the compiler and ptxas/cuobjdump/nvdisasm; ~0 on a Triton cache hit).
    return {**result, "compile_cpu_s": round(_cpu_seconds() - start, 2)}


class Compiler:
    """Compiles every target of each launch handed to ``submit`` in a pool of ``jobs`` fresh processes
    while the recorder goes on (on 2 cores the pool uses the core the interpreter leaves idle).
    Launches arrive unique by key; Triton's cache (``TRITON_CACHE_DIR``) makes a rerun of an unchanged
    kernel skip the compiler."""

    def __init__(self, targets, jobs):
        import multiprocessing

        os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
        self.targets = list(targets)
        self.pool = ProcessPoolExecutor(
            jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_jit_worker_init
        )
        self.pending = []

    def submit(self, launch):
        for target in self.targets:
            self.pending.append((launch, target, self.pool.submit(_compile_task, launch, target)))

    def finish(self, launches):
        for launch in launches:
            launch["results"] = {}
        for launch, target, future in self.pending:
            launch["results"][f"sm_{target}"] = future.result()
        self.pool.shutdown()
        return launches


# ------------------------------------------------------------------------------------------ report
def _launch_label(launch) -> str:
    pointers = sorted({t for t in launch["signature"].values() if t.startswith("*") and t not in ("*i32", "*i64")})
    names = list(launch["signature"])
    shown = [
        f"{names[path[0]]}={value}"
        for path, value in launch["constexprs"]
        if names[path[0]].isupper() and not isinstance(value, dict)
    ]
    return f"{','.join(pointers)} {' '.join(shown)} w{launch['num_warps']}s{launch['num_stages']}"


def failures(report) -> list[str]:
    out = list(report["record_errors"])
    out += [f"kernel {k} was never launched by a case" for k in report["unlaunched_kernels"]]
    for launch in report["launches"]:
        for target, result in launch["results"].items():
            where = f"{launch['kernel']} {target} [{_launch_label(launch)}]"
            if "error" in result:
                out.append(f"{where}: compile error: {result['error']}")
                continue
            allowed = STACK_ALLOWANCE.get((launch["kernel"], int(target[3:])), 0)
            if result["stack_bytes"] > allowed or result["local_bytes"] > 0:
                out.append(
                    f"{where}: spills: stack {result['stack_bytes']} B (allowed {allowed}), "
                    f"local {result['local_bytes']} B, {result['registers']} registers"
                )
    return out


def _fmt_loads(loads: dict) -> str:
    return " ".join(f"{op}x{n}" for op, n in sorted(loads.items())) or "-"


def markdown(report) -> str:
    rows = [
        "| kernel | launch | sm | regs | stack B | smem B | hot-loop global loads (all loads' widths, B) |",
        "|---|---|---|---|---|---|---|",
    ]
    for launch in sorted(report["launches"], key=lambda x: (x["module"], x["kernel"], _launch_label(x))):
        for target, r in sorted(launch["results"].items()):
            if "error" in r:
                rows.append(f"| {launch['kernel']} | {_launch_label(launch)} | {target} | compile error | | | |")
                continue
            rows.append(
                f"| {launch['kernel']} | {_launch_label(launch)} | {target[3:]} | {r['registers']} | "
                f"{r['stack_bytes']} | {r['shared_bytes']} | {_fmt_loads(r['loop_global_loads'])} "
                f"({','.join(map(str, r['load_bytes']))}) |"
            )
    summary = ["| kernel | sm | launches | max regs | max stack B | max smem B | hot-loop load widths B |"]
    summary.append("|---|---|---|---|---|---|---|")
    per = {}
    for launch in report["launches"]:
        for target, r in launch["results"].items():
            if "error" not in r:
                per.setdefault((launch["kernel"], target), []).append(r)
    for (kernel, target), results in sorted(per.items()):
        widths = sorted({w for r in results for w in r["loop_load_bytes"]})
        summary.append(
            f"| {kernel} | {target[3:]} | {len(results)} | {max(r['registers'] for r in results)} | "
            f"{max(r['stack_bytes'] for r in results)} | {max(r['shared_bytes'] for r in results)} | "
            f"{','.join(map(str, widths)) or '-'} |"
        )
    return "\n".join(summary) + "\n\n" + "\n".join(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="output JSON (default bench/results/codegen-<date>.json)")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--targets", type=int, nargs="+", default=list(TARGETS))
    parser.add_argument(
        "--quick",
        action="store_true",
        help="one IAF stand-in volume a dtype instead of two (the same launches): the CI test",
    )
    args = parser.parse_args(argv)
    # The recorder needs the interpreter, set before triton is first imported.
    os.environ["TRITON_INTERPRET"] = "1"
    import triton

    compiler = Compiler(args.targets, max(1, args.jobs))
    start = _cpu_seconds()
    launches, record_errors = record_launches(args.quick, on_new=compiler.submit)
    record_cpu = _cpu_seconds() - start
    report = {
        "date": datetime.date.today().isoformat(),
        "triton": triton.__version__,
        "targets": args.targets,
        "stack_allowance": [[k, sm, b] for (k, sm), b in STACK_ALLOWANCE.items()],
        "record_errors": record_errors,
        "unlaunched_kernels": sorted(set(_kernels_defined()) - {x["kernel"] for x in launches}),
        "quick": args.quick,
        "record_cpu_s": round(record_cpu, 1),
        "launches": compiler.finish(launches),
    }
    report["failures"] = failures(report)
    out = Path(args.json) if args.json else ROOT / "bench" / "results" / f"codegen-{report['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(markdown(report))
    compile_cpu = sum(r["compile_cpu_s"] for x in report["launches"] for r in x["results"].values())
    print(f"\n{len(report['launches'])} distinct launches x {len(args.targets)} targets -> {out}")
    print(f"CPU seconds: {compile_cpu:.0f} compiling, {report['record_cpu_s']:.0f} recording")
    for failure in report["failures"]:
        print(f"FAIL: {failure}")
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
