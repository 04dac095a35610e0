"""Grouped per-layer statistics against the per-layer loop they replace.

Sections (each compares providers on the same inputs, median of interleaved repetitions):
  growth  one online-growth estimate (top singular values of every layer's projected gradient,
          4 power iterations): ``loop`` = the per-layer ``projected_top_singular`` with a host
          copy per layer, ``grouped`` =
          ``projected_top_singular_many`` as dispatched (the grouped Triton kernels on CUDA; the
          per-layer loop on a single CPU process), ``lockstep`` (CPU) = its PyTorch lockstep
          path, which runs under DDP (one collective per step for all layers)
  fisher  exact per-example squared gradient norms of every layer (the Fisher-trace statistic):
          ``loop`` = ``per_example_sq_grad_norms`` per layer, ``grouped`` = the Gram kernel for
          all layers in one launch (CUDA only)
  dots    per-layer dot products of 224 7B-shaped rank-16 tensors (the Hutchinson reduction):
          ``foreach`` = a ``torch._foreach_mul`` path, ``loop`` = the plain fp32 loop (lorambo's
          CPU path without the extension), ``ext`` = the compiled extension (CPU, when built), ``grouped`` =
          the row-dot kernel (CUDA)

Shapes: MiniLM-like (36 layers: 384x384 x4 + 384->1536 + 1536->384 per block, 6 blocks) and
7B-like (224 layers: q/k/v/o 4096x4096, gate/up 4096->11008, down 11008->4096, 32 blocks).
Rows are appended to ``<out>/sketch.csv`` with the device, versions, threads and load.

    python benchmarks/bench_sketch.py --quick            # GPU (not run on one yet)
    python benchmarks/bench_sketch.py --cpu-small        # CPU: what a CPU can do (small token counts)
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "kernels"), str(ROOT / "benchmarks")]

import lorambo  # noqa: E402
from arg_lists import positive  # noqa: E402
from machine import device_name  # noqa: E402
from results_csv import append_rows  # noqa: E402
from lorambo.allocation.benefits import (projected_top_singular, projected_top_singular_many,  # noqa: E402
                                         subspace_basis)
from lorambo.ops import sketch as ops_sketch  # noqa: E402
from lorambo.sensitivity.fisher import per_example_sq_grad_norms  # noqa: E402
from lorambo.sensitivity.reductions import per_layer_dots  # noqa: E402

MINILM = [(384, 384)] * 4 + [(384, 1536), (1536, 384)]          # (in, out) per block
SEVEN_B = [(4096, 4096)] * 4 + [(4096, 11008)] * 2 + [(11008, 4096)]
SHAPES = {"minilm": MINILM * 6, "7b": SEVEN_B * 32}
FIELDS = ["date", "device", "torch", "triton", "python", "threads", "load", "section", "shape", "layers",
          "tokens", "dtype", "provider", "ms_median", "ms_min", "reps", "speedup_vs_loop", "note"]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def interleaved(fns: dict, device, reps: int) -> dict:
    """{name: (median ms, min ms)} with the providers run in turn (one warm-up each)."""
    times = {k: [] for k in fns}
    for fn in fns.values():
        fn()
    _sync(device)
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append((time.perf_counter() - start) * 1e3)
    return {k: (statistics.median(v), min(v)) for k, v in times.items()}


def layer_inputs(shape: str, tokens: int, device, dtype, distinct: int):
    """Per layer: X [T, in], dY [T, out] (at most ``distinct`` different tensors per shape,
    reused cyclically to bound memory), A rows [r, in], B cols [out, r] (rank 8)."""
    gen = torch.Generator(device=device).manual_seed(0)
    pool: dict = {}
    layers = []
    for n_in, n_out in SHAPES[shape]:
        bucket, seen = pool.setdefault((n_in, n_out), ([], [0]))
        if len(bucket) < distinct:
            bucket.append((torch.randn(tokens, n_in, generator=gen, device=device, dtype=dtype),
                           torch.randn(tokens, n_out, generator=gen, device=device, dtype=dtype) / tokens))
        x, dy = bucket[seen[0] % len(bucket)]
        seen[0] += 1
        a = torch.randn(8, n_in, generator=gen, device=device, dtype=dtype) / n_in ** 0.5
        b = torch.randn(n_out, 8, generator=gen, device=device, dtype=dtype)
        layers.append((x, dy, a, b))
    return layers


def growth_section(shape, tokens, device, dtype, reps, distinct, meta):
    layers = layer_inputs(shape, tokens, device, dtype, distinct)
    k, niter = 4, 4

    def loop():  # the per-layer estimate as decisions took it: bases, power iteration, host copy
        out = []
        for i, (x, dy, a, b) in enumerate(layers):
            work = torch.promote_types(x.dtype, torch.float32)
            sigma, _ = projected_top_singular([(x, dy)], x.shape[1], dy.shape[1], k,
                                              subspace_basis(a.T.to(work)), subspace_basis(b.to(work)), niter, 4,
                                              torch.Generator().manual_seed(i))
            out.append(sigma.double().cpu().numpy())
        return out

    def grouped(lockstep=None):
        return projected_top_singular_many(
            [[(x, dy)] for x, dy, _, _ in layers], [x.shape[1] for x, _, _, _ in layers],
            [dy.shape[1] for _, dy, _, _ in layers], [k] * len(layers), [a.T for _, _, a, _ in layers],
            [b for _, _, _, b in layers], niter, 4, [torch.Generator().manual_seed(i) for i in range(len(layers))],
            list(range(len(layers))), lockstep=lockstep)[0]

    fns = {"loop": loop, "grouped": grouped}
    if device.type == "cpu":  # the default there is the per-layer loop; the lockstep path runs under DDP
        fns["lockstep"] = lambda: grouped(lockstep=True)
    res = interleaved(fns, device, reps)
    path = ("kernels" if ops_sketch.use_sketch_kernels([layers[0][0]])
            else "per-layer loop (single CPU process); lockstep = the PyTorch lockstep path used under DDP")
    return rows_for(meta, "growth", shape, len(layers), tokens, dtype, res, reps, f"grouped = {path}")


def fisher_section(shape, tokens, device, dtype, reps, distinct, meta, seq=128):
    if not ops_sketch.use_sketch_kernels([torch.empty(0, device=device, dtype=dtype)]):
        return []
    layers = layer_inputs(shape, tokens, device, dtype, distinct)
    xs = [x.view(-1, seq, x.shape[1]) for x, _, _, _ in layers]
    dys = [dy.view(-1, seq, dy.shape[1]) for _, dy, _, _ in layers]
    res = interleaved({"loop": lambda: [per_example_sq_grad_norms(x, dy) for x, dy in zip(xs, dys)],
                       "grouped": lambda: ops_sketch.sq_grad_norms_many(xs, dys)}, device, reps)
    return rows_for(meta, "fisher", shape, len(layers), tokens, dtype, res, reps, f"{seq} tokens per example")


def dots_section(device, dtype, reps, meta, probes=1, scale=1):
    from lorambo.ext import ops as ext_ops

    xs = [torch.randn(probes, 16 * (i + o) // scale, device=device).to(dtype) for i, o in SHAPES["7b"]]
    ys = [torch.randn_like(x) for x in xs]

    def foreach():
        products = torch._foreach_mul(xs, ys)
        return torch.stack([p.flatten(1).sum(1, dtype=torch.float64) for p in products], dim=1)

    def plain_loop():
        ops_sketch.set_sketch_backend("torch")
        lorambo.set_backend("torch")
        try:
            return per_layer_dots(xs, ys)
        finally:
            lorambo.set_backend(None)
            ops_sketch.set_sketch_backend(None)

    fns = {"loop": plain_loop, "foreach": foreach}
    if device.type == "cpu" and ext_ops.available():
        fns["ext"] = lambda: ext_ops.multi_dot(xs, ys, rows=probes)
    if ops_sketch.use_sketch_kernels(xs):
        fns["grouped"] = lambda: ops_sketch.row_dots(xs, ys)
    res = interleaved(fns, device, reps)
    return rows_for(meta, "dots", "7b", len(xs), probes * sum(x.shape[1] for x in xs), dtype, res, reps,
                    f"{probes} probe row(s) of rank-16 tensors; tokens column = elements")


def rows_for(meta, section, shape, layers, tokens, dtype, res, reps, note):
    rows = []
    base = res["loop"][0]
    for provider, (med, best) in res.items():
        rows.append(dict(meta, section=section, shape=shape, layers=layers, tokens=tokens,
                         dtype=str(dtype).replace("torch.", ""), provider=provider, ms_median=f"{med:.3f}",
                         ms_min=f"{best:.3f}", reps=reps, speedup_vs_loop=f"{base / med:.2f}", note=note))
    print(f"{section:>6} {shape:>6} L={layers:<4} T={tokens:<7} "
          + "  ".join(f"{p} {m:.2f} ms" for p, (m, _) in res.items()), flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="GPU: 4k tokens, few repetitions")
    parser.add_argument("--cpu-small", action="store_true", help="CPU-feasible sizes only")
    parser.add_argument("--tiny", action="store_true", help="seconds on a CPU: checks the script runs")
    parser.add_argument("--tokens", type=positive(), nargs="*", help="token counts (default 4096 8192 16384)")
    parser.add_argument("--reps", type=positive(), default=None)
    parser.add_argument("--sections", nargs="+", default=["growth", "fisher", "dots"],
                        choices=["growth", "fisher", "dots"])
    parser.add_argument("--threads", type=positive(), default=None, help="torch intra-op threads (CPU)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    small = args.cpu_small or args.tiny
    device = torch.device("cuda" if torch.cuda.is_available() and not small else "cpu")
    if device.type == "cpu" and not small:
        parser.error("the default and --quick sizes (7B-like layers at >= 4096 tokens, tens of GB) are for a "
                     "GPU and none is available; use --cpu-small or --tiny")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.tiny:
        plan = [("minilm", 16)]
        reps, distinct = args.reps or 1, 1
    elif args.cpu_small:
        plan = [("minilm", 256), ("minilm", 1024), ("7b", 32)]
        reps, distinct = args.reps or 3, 1
    elif args.quick:
        plan = [("minilm", 4096), ("7b", 4096)]
        reps, distinct = args.reps or 2, 2
    else:
        tokens = args.tokens or [4096, 8192, 16384]
        plan = [(s, t) for s in ("minilm", "7b") for t in tokens]
        reps, distinct = args.reps or 5, 4
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = ""
    meta = dict(date=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), device=device_name(device),
                torch=torch.__version__, triton=triton_version, python=platform.python_version(),
                threads=torch.get_num_threads(), load=" ".join(f"{v:.2f}" for v in os.getloadavg()))
    rows = []
    for shape, tokens in plan:
        if "growth" in args.sections:
            rows += growth_section(shape, tokens, device, dtype, reps, distinct, meta)
        if "fisher" in args.sections:
            rows += fisher_section(shape, tokens, device, dtype, reps, distinct, meta)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if "dots" in args.sections:
        for dt_ in ((torch.float32, torch.bfloat16) if device.type == "cpu" else (torch.bfloat16,)):
            rows += dots_section(device, dt_, reps, meta, scale=64 if args.tiny else 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "sketch.csv"
    append_rows(path, FIELDS, rows)
    print(f"appended {len(rows)} rows to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
