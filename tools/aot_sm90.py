"""Ahead-of-time compilation of every kernel the launchers launch, for a GPU this machine lacks.

The CPU test suite runs the kernels only in Triton's interpreter, which enforces none of the GPU
compile rules (``tl.dot`` shapes, layouts, shared memory, TMA descriptors). This module compiles
them for a real target (default: H100, sm_90) with Triton's own toolchain (ptxas ships with
triton); no GPU, driver or CUDA runtime is needed.

1. :func:`collect` runs the real launchers (``lora_linear_forward``/``backward``, hence
   ``lora_gemm``, ``lora_down``, ``lora_wgrad``; and ``dropout_keep_mask``) on meta tensors over a
   sweep of shapes, ranks, dtypes and flags, inside ``config.plan_for_gpu`` (block shapes, SM count
   and the TMA switch as on that GPU), with every ``@triton.jit`` object of the package replaced
   by a recorder. Each recorded launch is bound the way ``JITFunction.run`` binds it
   (``aot_cases.bind``: Triton's own specialization: pointer dtypes, i32/i64 by value, ints equal
   to 1 become constexprs, 16-divisible ints and pointers get ``tt.divisibility``), so a case
   (``aot_cases.Case``) is exactly one variant the GPU would compile. The TMA GEMM is recorded
   where sm_90 takes it, and the pointer GEMM for every launch too (it runs on sm_90 whenever
   descriptors do not fit, under ``LORAMBO_TMA=0``, and after a TMA build failure).
2. :func:`compile_all` compiles each case with ``triton.compile(ASTSource(...), target=...)``
   and reports registers and spill stack (cuobjdump, also shipped with triton) and the dynamic
   shared memory from the kernel metadata, which must fit the target's per-block limit (Triton
   checks that only when a kernel is loaded on a GPU).

Under ``TRITON_INTERPRET=1`` the kernels are interpreter objects that cannot be compiled (and
the interpreter patches ``triton.language`` in place), so compilation then runs in a worker
process with the variable removed: it works the same from the CPU test suite.

Assumed: every tensor is 16-byte aligned (fresh allocations and the launchers' views all start
at offset 0 of an allocation), inputs are contiguous, and x, weight, bias and the pools share
one dtype, as ``lorambo.ops.triton_linear`` checks.

``python tools/aot_sm90.py`` compiles the full sweep and prints a summary; it exits 1 on any
failure (a compile error, or shared memory over the target's limit). A development tool: it lives
outside the installed packages and imports lorambo_kernels from the checkout or the environment.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import inspect
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from typing import Callable, Iterable

import torch
import triton
from triton.backends.compiler import GPUTarget

import lorambo_kernels
from aot_cases import Case, Result, bind, jit_functions, jit_types
from lorambo_kernels import config

H100 = GPUTarget("cuda", 90, 32)

# Per-block shared memory (opt-in maximum, bytes) and SM counts by compute capability.
SHARED_LIMIT = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448, 100: 232448, 120: 101376}
SM_COUNT = {80: 108, 86: 84, 89: 128, 90: 132, 100: 148, 120: 84}

# The full sweep (``python tools/aot_sm90.py``). M = 128 is gemm_config's middle bucket and
# rank 32 the rank bucket 32; rank 0 (no LoRA term) and 256 (> the largest bucket: down-projection
# + LoRA GEMM in the forward, ranks looped in chunks) are launcher paths of their own. Each rank
# runs with a pool of capacity = rank and of capacity 128 (other pool strides).
M_VALUES = (2048, 8192, 128, 17, 1)
KN_VALUES = ((4096, 4096), (4096, 11008), (11008, 4096), (768, 768))
RANKS = (0, 1, 8, 16, 32, 64, 128, 256)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # fp32 with torch's allow_tf32 off and on
DROPOUTS = (0.0, 0.1)
SCALINGS = (2.0, 1e5)  # without dropout; 1e5 is outside [1e-4, 1e4]: a separate LoRA accumulator
SEEDS = (12345, 2**40)  # with dropout: an i32 and an i64 seed (lorambo draws them in [0, 2**62))
# Backward (need_x, need_w, need_b, need_a, need_bb), need_b only with a bias: every launch the
# backward makes (dX writing t' or not, dA via lora_down when dX is not asked, dB with and without
# the bias column sums, dW).
NEEDS = ((True, True, True, True, True), (True, False, False, False, True), (False, False, False, True, False))

_WORKER_TAG = "@@lorambo-aot@@ "


# -------------------------------------------------------------------------- recording
class _Recorder:
    def __init__(self, key, jit, sink):
        self.key, self.jit, self.sink = key, jit, sink

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.sink.append((self.key, self.jit, args, kwargs))

        return launch

    def __call__(self, *args, **kwargs):  # a helper called outside a kernel: never in a launcher
        raise RuntimeError(f"aot_sm90: {self.key} called directly")


@contextlib.contextmanager
def _recording(capability: tuple[int, int], sm_count: int):
    """Launchers see ``capability``/``sm_count`` and launch nothing: each ``kernel[grid](...)``
    is appended to the yielded list instead. Restores the modules, the TMA switch and the TF32
    flag afterwards."""
    from lorambo_kernels import fused_gemm

    sink: list = []
    patched = []
    for key, obj in jit_functions().items():
        mod_name, name = key.split(":")
        mod = sys.modules[mod_name]
        patched.append((mod, name, obj))
        setattr(mod, name, _Recorder(key, obj, sink))
    old_env = os.environ.get("LORAMBO_TMA")
    old_disabled = fused_gemm._tma_disabled
    old_tf32 = torch.backends.cuda.matmul.allow_tf32
    os.environ["LORAMBO_TMA"] = "auto"
    try:
        with config.plan_for_gpu(sm_count, capability):
            yield sink
    finally:
        for mod, name, obj in patched:
            setattr(mod, name, obj)
        if old_env is None:
            os.environ.pop("LORAMBO_TMA", None)
        else:
            os.environ["LORAMBO_TMA"] = old_env
        fused_gemm._tma_disabled = old_disabled
        torch.backends.cuda.matmul.allow_tf32 = old_tf32


def _launch_sweep(M_values, kn_values, ranks, dtypes, dropouts, scalings, seeds, needs, caps, tma_modes):
    """Yield (description, thunk) for every launcher call of the sweep (meta tensors). caps:
    "rank" (pool capacity = rank) or "both" (also 128)."""
    from lorambo_kernels import dropout as dropout_mod
    from lorambo_kernels import fused_gemm, lora_linear

    meta = torch.device("meta")
    for tma, dtype in itertools.product(tma_modes, dtypes):
        tf32s = (False, True) if dtype == torch.float32 else (False,)
        for tf32, M, (K, N), rank in itertools.product(tf32s, M_values, kn_values, ranks):
            capacities = sorted({max(rank, 1), max(rank, 128)} if caps == "both" else {max(rank, 1)})
            for cap, has_bias, p in itertools.product(capacities, (True, False), dropouts):
                for scaling, seed in (itertools.product(scalings, (0,)) if p == 0 else
                                      itertools.product(scalings[:1], seeds)):
                    def setup(tma=tma, tf32=tf32):
                        fused_gemm._tma_disabled = None if tma else "aot_sm90: pointer-kernel pass"
                        torch.backends.cuda.matmul.allow_tf32 = tf32

                    def mk(*shape, dtype=dtype):
                        return torch.empty(shape, dtype=dtype, device=meta)

                    desc = (f"M={M} K={K} N={N} rank={rank} cap={cap} {str(dtype)[6:]} bias={has_bias} p={p} "
                            f"s={scaling:g} seed={seed} tma={'auto' if tma else 'off'}"
                            + (f" tf32={tf32}" if dtype == torch.float32 else ""))
                    x, w, A, B = mk(M, K), mk(N, K), mk(cap, K), mk(N, cap)
                    bias = mk(N) if has_bias else None

                    def fwd(x=x, w=w, bias=bias, A=A, B=B, rank=rank, scaling=scaling, p=p, seed=seed, setup=setup):
                        setup()
                        lora_linear.lora_linear_forward(x, w, bias, A, B, rank, scaling, p, seed)

                    yield f"lora_linear_forward({desc})", fwd
                    for need in dict.fromkeys((n[0], n[1], n[2] and has_bias, n[3], n[4]) for n in needs):
                        def bwd(x=x, w=w, A=A, B=B, rank=rank, scaling=scaling, p=p, seed=seed, needs=need,
                                setup=setup, M=M, N=N, mk=mk):
                            setup()
                            dy, t = mk(M, N), mk(M, rank)
                            lora_linear.lora_linear_backward(dy, x, w, A, B, t, rank, scaling, p, seed, needs)

                        yield f"lora_linear_backward({desc} needs={''.join('01'[n] for n in need)})", bwd
    for M, (K, _), p, seed in itertools.product(M_values, kn_values, [p for p in dropouts if p > 0] or [0.1], seeds):
        def mask(M=M, K=K, p=p, seed=seed):
            dropout_mod.dropout_keep_mask(seed, M, K, p, meta)

        yield f"dropout_keep_mask(seed={seed}, M={M}, K={K}, p={p})", mask
    yield from _sketch_launches(dtypes)


def _sketch_launches(dtypes):
    """The grouped sketch launchers (lorambo_kernels.sketch) on meta tensors: 7B-like layers of
    two shapes, generated and explicit probes both ways, 1 and 64 columns, in bf16 (the training
    dtype; fp16 and fp32 differ only in the pointer type of the loads and compiled as well when
    this sweep was written, which kept them off to spare the suite ~20 compiles)."""
    from lorambo_kernels import sketch

    meta = torch.device("meta")
    for dtype, p in itertools.product([d for d in dtypes if d == torch.bfloat16], (1, 64)):
        def mk(*shape, dtype=dtype):
            return torch.empty(shape, dtype=dtype, device=meta)

        def products(dtype=dtype, p=p, mk=mk):
            xs = [mk(4096, 4096), mk(2048, 4096), mk(4096, 11008)]
            dys = [mk(4096, 4096), mk(2048, 4096), mk(4096, 4096)]
            group = sketch.SketchGroup(xs, dys, [0, 0, 1], [4096, 11008], [4096, 4096], p, seeds=[1, 2])
            for adjoint in (False, True):
                group.apply(None, adjoint)
                group.apply(torch.empty(group.numel(not adjoint), dtype=torch.float32, device=meta), adjoint)

        yield f"SketchGroup.apply({str(dtype)[6:]}, p={p})", products

        def grams(mk=mk):
            sketch.gram_sq_norms([mk(32, 128, 4096), mk(16, 512, 11008)], [mk(32, 128, 11008), mk(16, 512, 4096)])

        yield f"gram_sq_norms({str(dtype)[6:]})", grams

        def dots(mk=mk, p=p):
            sketch.row_dots([mk(p, 16, 15104), mk(p, 16, 8192)], [mk(p, 16, 15104), mk(p, 16, 8192)])
            sketch.row_dots([mk(p, 16, 15104)])

        yield f"row_dots({str(dtype)[6:]}, rows={p})", dots
    yield "gaussian_probe(n=4096, p=8)", lambda: sketch.gaussian_probe(3, 4096, 8, meta)


SWEEPS = {
    # the module constants above
    "full": dict(M_values=M_VALUES, kn_values=KN_VALUES, ranks=RANKS, dtypes=DTYPES, dropouts=DROPOUTS,
                 scalings=SCALINGS, seeds=SEEDS, needs=NEEDS, caps="both", tma_modes=(True, False)),
    # enough to reach every launcher configuration of "full" (each block-shape bucket of M, each
    # rank bucket and path), for collect(distinct_configs=True); checked equal when written
    # (11008, 4096) for the fp32 wgrad partials of a narrow layer's dB)
    "configs": dict(M_values=(8192, 2048, 128, 17), kn_values=((4096, 11008), (11008, 4096)),
                    ranks=(0, 16, 32, 64, 128, 256), dtypes=DTYPES, dropouts=DROPOUTS, scalings=SCALINGS, seeds=SEEDS,
                    needs=NEEDS, caps="rank", tma_modes=(True, False)),
}


def collect(target: GPUTarget = H100, sweep: str | dict = "full", *, sm_count: int | None = None,
            distinct_configs: bool = False) -> list[Case]:
    """The distinct kernel variants the launchers compile on ``target`` over ``sweep`` (a name in
    SWEEPS or a dict of _launch_sweep's arguments), in first-seen order.

    distinct_configs: one case per :meth:`Case.config_key` (kernel x launcher constexprs x
    options x argument types), dropping the variants that differ only in Triton's value
    specialization of run-time ints; each kept case is the first one seen (shapes are swept in
    M_VALUES order, so a typical large M)."""
    from triton.compiler.compiler import make_backend

    capability = divmod(target.arch, 10)
    sms = sm_count or SM_COUNT.get(target.arch, 132)
    backend = make_backend(target)
    spec = SWEEPS[sweep] if isinstance(sweep, str) else sweep
    seen: dict = {}
    with _recording(capability, sms) as sink:
        for desc, thunk in _launch_sweep(**spec):
            sink.clear()
            thunk()
            for key, obj, args, kwargs in sink:
                case = bind(key, obj, args, kwargs, backend)
                k = case.config_key() if distinct_configs else case
                if k not in seen:
                    seen[k] = dataclasses.replace(case, example=desc)
    return list(seen.values())


_TILE = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_P", "GROUP_M", "PRECISION")
_LAYOUT = ("A_T", "B_T", "D_T")
_FLAGS = ("HAS_BIAS", "LORA_ACC", "DROP_OUT", "WRITE_U", "DROP", "COLSUM")


def _features(case: Case) -> frozenset:
    """What a compile of ``case`` exercises, for :func:`representative`."""
    d = case.declared_constexprs()
    dtype = next(t for _, t in case.signature if t.startswith(("*", "tensordesc")))
    tile = tuple((k, v) for k, v in d.items() if k in _TILE)
    flags = tuple((k, v) for k, v in d.items() if k not in _TILE and k not in _LAYOUT and k != "BLOCK_R")
    layout = tuple((k, v) for k, v in d.items() if k in _LAYOUT)
    types = tuple(sorted({t for _, t in case.signature if not t.startswith("tensordesc")}))
    return frozenset({("tile", case.kernel, dtype, tile, case.options), ("rank", case.kernel, dtype, d.get("BLOCK_R")),
                      ("flags", case.kernel, flags), ("layout", case.kernel, layout), ("types", case.kernel, types)})


def representative(cases: list[Case]) -> list[Case]:
    """A small subset of ``cases`` (greedy set cover, deterministic) that still compiles, for every
    kernel: each block-shape configuration (tile, precision, warps, stages) with each dtype, each
    rank bucket with each dtype, each combination of the flag constexprs, each TMA operand layout
    and each set of argument types (i64 seeds, fp32 partials). Ties go to the largest rank bucket
    and the most flags set (the most registers and shared memory)."""
    feats = [_features(c) for c in cases]

    def weight(i):
        d = cases[i].declared_constexprs()
        return (d.get("BLOCK_R", 0), sum(bool(d.get(k)) for k in _FLAGS) + (d.get("LORA") == 2), -i)

    need = set().union(*feats)
    chosen = []
    while need:
        best = max(range(len(cases)), key=lambda i: (len(feats[i] & need), weight(i)))
        chosen.append(best)
        need -= feats[best]
    return [cases[i] for i in sorted(chosen)]


def uncovered_kernels(cases: Iterable[Case]) -> list[str]:
    """``@triton.jit`` functions of the package that no case launches and no other jit function's
    source calls: a kernel whose launcher the sweep misses."""
    launched = {c.kernel for c in cases}
    funcs = jit_functions()
    sources = {k: inspect.getsource(obj.fn) for k, obj in funcs.items()}
    out = []
    for key in funcs:
        name = key.split(":")[1]
        called = any(re.search(rf"\b{re.escape(name)}\s*\(", src.split(":", 1)[1])
                     for k, src in sources.items() if k != key)
        if key not in launched and not called:
            out.append(key)
    return out


# -------------------------------------------------------------------------- compiling
def _resource_usage(cubin: bytes, name: str) -> tuple[int | None, int | None]:
    """(registers, stack bytes) of ``name`` in ``cubin``, from cuobjdump -res-usage."""
    try:
        from triton import knobs

        tool = knobs.nvidia.cuobjdump.path
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(cubin)
            f.flush()
            out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, timeout=60).stdout
    except Exception:  # noqa: BLE001 - optional information
        return None, None
    m = re.search(rf"Function {re.escape(name)}:\s*REG:(\d+) STACK:(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else (None, None)


def _describe(err: BaseException) -> str:
    """The error and its causes (a CompilationError points at the call in the kernel; the rule
    that failed is in its __cause__, possibly nested through helper functions)."""
    parts, seen = [], set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        parts.append(f"{type(err).__name__}: {err}".strip())
        err = err.__cause__ or err.__context__
    return "\n-- caused by --\n".join(parts)


def compile_case(case: Case, target: GPUTarget = H100) -> Result:
    """Compile one case in this process (its triton must be in compiled mode)."""
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    start = time.perf_counter()
    limit = SHARED_LIMIT.get(target.arch)
    try:
        mod, name = case.kernel.split(":")
        kernel = getattr(importlib.import_module(mod), name)
        if not isinstance(kernel, JITFunction):
            raise RuntimeError(f"{case.kernel} is a {type(kernel).__name__} (TRITON_INTERPRET=1?), not a JITFunction")
        names = kernel.arg_names
        src = ASTSource(kernel, dict(case.signature),
                        constexprs={(names.index(k),): v for k, v in case.constexprs},
                        attrs={(names.index(k),): [list(a) for a in v] for k, v in case.attrs})
        compiled = triton.compile(src, target=target, options=dict(case.options))
        shared = getattr(compiled.metadata, "shared", None)
        regs, stack = _resource_usage(compiled.asm.get("cubin", b""), compiled.metadata.name)
        return Result(case, True, n_regs=regs, stack=stack, shared=shared, shared_limit=limit,
                      seconds=time.perf_counter() - start)
    except Exception as err:  # noqa: BLE001 - the report is the point
        return Result(case, False, error=_describe(err), shared_limit=limit, seconds=time.perf_counter() - start)


def _in_process_ok() -> bool:
    JITFunction, _ = jit_types()
    return all(isinstance(obj, JITFunction) for obj in jit_functions().values())


def _worker_env() -> dict:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    root = os.path.dirname(os.path.dirname(os.path.abspath(lorambo_kernels.__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def _run_worker(todo: list[tuple[int, Case]], target: GPUTarget, report: Callable[[int, Result], None]) -> None:
    """Compile the (index, case) pairs in worker processes (one at a time; another one if a worker
    dies, after reporting the case it died on)."""
    todo = list(todo)
    while todo:
        with tempfile.TemporaryFile(mode="w+") as err, tempfile.TemporaryFile(mode="w+") as inp:
            inp.write(json.dumps({"target": [target.backend, target.arch, target.warp_size]}) + "\n")
            for _, case in todo:
                inp.write(json.dumps(case.to_json()) + "\n")
            inp.flush()
            inp.seek(0)
            proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker"], stdin=inp,
                                    stdout=subprocess.PIPE, stderr=err, text=True, env=_worker_env())
            for line in proc.stdout:
                if not line.startswith(_WORKER_TAG):
                    continue
                d = json.loads(line[len(_WORKER_TAG):])
                d.pop("case")
                i, case = todo.pop(0)
                report(i, Result(case, **d))
            rc = proc.wait()
            if todo:  # died on todo[0]
                err.seek(0)
                tail = err.read()[-4000:]
                i, case = todo.pop(0)
                report(i, Result(case, False, error=f"compile worker exited with {rc} on this case:\n{tail}",
                                 shared_limit=SHARED_LIMIT.get(target.arch)))


def _worker_main() -> int:
    first = sys.stdin.readline()
    target = GPUTarget(*json.loads(first)["target"])
    for line in sys.stdin:
        if not line.strip():
            continue
        res = compile_case(Case.from_json(json.loads(line)), target)
        d = dataclasses.asdict(res)
        d["case"] = None
        sys.stdout.write(_WORKER_TAG + json.dumps(d) + "\n")
        sys.stdout.flush()
    return 0


def compile_all(cases: list[Case] | None = None, target: GPUTarget = H100,
                progress: Callable[[int, int, Result], None] | None = None, *, jobs: int = 1,
                in_process: bool | None = None) -> list[Result]:
    """Compile ``cases`` (default: ``collect(target)``) for ``target``; one Result per case, in
    order. progress(done, total, result) is called after each. In process when this process's
    kernels are compiled-mode JITFunctions (and jobs == 1), else in ``jobs`` worker processes
    without TRITON_INTERPRET."""
    if cases is None:
        cases = collect(target)
    cases = list(cases)
    total = len(cases)
    results: dict[int, Result] = {}
    lock = threading.Lock()

    def report(i: int, res: Result) -> None:
        with lock:
            results[i] = res
            if progress is not None:
                progress(len(results), total, res)

    if in_process is None:
        in_process = jobs == 1 and _in_process_ok()
    if in_process:
        for i, case in enumerate(cases):
            report(i, compile_case(case, target))
    else:
        jobs = max(1, min(jobs, total))
        indexed = list(enumerate(cases))
        threads = [threading.Thread(target=_run_worker, args=(indexed[j::jobs], target, report)) for j in range(jobs)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return [results[i] for i in range(total)]


# ------------------------------------------------------------------------------- CLI
def _fmt(v) -> str:
    return "-" if v is None else str(v)


def summarize(results: list[Result], out=sys.stdout) -> None:
    """One row per launcher configuration (kernel x constexprs x options x dtypes), aggregating
    the value-specialized variants: count, failures, max registers / spill stack / shared."""
    groups: dict = {}
    for r in results:
        groups.setdefault(r.case.config_key(), []).append(r)
    rows = []
    for key, rs in groups.items():
        label = rs[0].case.label(specialization=False)
        bad = [r for r in rs if not r.passed]
        rows.append((label, len(rs), len(bad),
                     max((r.n_regs for r in rs if r.n_regs is not None), default=None),
                     max((r.stack for r in rs if r.stack is not None), default=None),
                     max((r.shared for r in rs if r.shared is not None), default=None)))
    width = max((len(r[0]) for r in rows), default=10)
    print(f"{'kernel[config]':<{width}}  {'vars':>4} {'fail':>4} {'regs':>4} {'spill':>5} {'smem':>7}", file=out)
    for label, n, nbad, regs, stack, smem in rows:
        print(f"{label:<{width}}  {n:>4} {nbad or '':>4} {_fmt(regs):>4} {_fmt(stack or None):>5} {_fmt(smem):>7}",
              file=out)
    bad = [r for r in results if not r.passed]
    spills = sum(1 for r in results if r.stack)
    print(f"\n{len(results)} variants, {len(groups)} configurations, {len(bad)} failed, "
          f"{spills} with register spills (stack > 0)", file=out)
    for r in bad:
        why = r.error if not r.ok else f"shared memory {r.shared} B > {r.shared_limit} B per block"
        print(f"\nFAILED {r.case.label()}\n  first seen in {r.case.example}\n  {why}", file=out)


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--worker"]:
        return _worker_main()
    ap = argparse.ArgumentParser(prog="python tools/aot_sm90.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability as an int (default 90: H100)")
    ap.add_argument("--sm-count", type=int, default=None, help="SMs for the configs (default: by arch)")
    ap.add_argument("--configs", action="store_true",
                    help="one variant per launcher configuration (what the test compiles), not every variant")
    ap.add_argument("--jobs", "-j", type=int, default=1, help="worker processes (default 1)")
    ap.add_argument("--list", action="store_true", help="list the cases, compile nothing")
    ap.add_argument("--verbose", "-v", action="store_true", help="a line per compiled variant")
    ap.add_argument("--json", metavar="PATH", help="also write every result to PATH (JSON)")
    args = ap.parse_args(argv)
    target = GPUTarget("cuda", args.arch, 32)
    t0 = time.perf_counter()
    cases = (collect(target, "configs", sm_count=args.sm_count, distinct_configs=True) if args.configs
             else collect(target, sm_count=args.sm_count))
    print(f"{len(cases)} kernel variants from the sweep ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    missing = uncovered_kernels(cases)
    if args.list:
        for c in cases:
            print(c.label(), "  <-", c.example)
    if missing:
        print(f"kernels the sweep never launches: {', '.join(missing)}", file=sys.stderr)
    if args.list:
        return 1 if missing else 0

    def progress(done, total, res):
        if args.verbose or not res.passed:
            status = "ok" if res.passed else "FAIL"
            print(f"[{done}/{total}] {status} {res.seconds:5.1f}s regs={_fmt(res.n_regs)} stack={_fmt(res.stack)} "
                  f"smem={_fmt(res.shared)} {res.case.label()}", file=sys.stderr, flush=True)
        elif done % 25 == 0 or done == total:
            print(f"[{done}/{total}] compiled", file=sys.stderr, flush=True)

    results = compile_all(cases, target, progress, jobs=args.jobs)
    if args.json:
        tmp = f"{args.json}.tmp{os.getpid()}"  # a reader never sees half a report
        with open(tmp, "w") as f:
            json.dump([{**dataclasses.asdict(r), "case": r.case.to_json(), "label": r.case.label()} for r in results],
                      f, indent=1)
        os.replace(tmp, args.json)
    summarize(results)
    print(f"total {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return 1 if missing or any(not r.passed for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
