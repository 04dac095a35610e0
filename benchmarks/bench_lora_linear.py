"""GPU benchmark of one frozen linear layer with LoRA: lorambo's fused Triton op vs the usual ways.

Providers:  base (frozen nn.Linear, cuBLAS) | peft_style (eager base + B(A(x))*s) | peft (the
            library, when importable) | compiled (torch.compile of peft_style) | lorambo
            (LoRAMBoLinear on the fused Triton kernels; also rank 8 in a capacity-128 pool)
Modes:      fwd, fwd_bwd (input gradient included, base frozen, LoRA parameters trainable)
Metrics:    triton.testing.do_bench median / p20 / p80 (ms) and peak extra memory (MiB)

Each run appends tidy rows (with GPU name and versions) to benchmarks/results/lora_linear.csv,
then redraws benchmarks/results/lora_linear.png and writes benchmarks/results/lora_linear.md
(the table for the README) from the whole CSV's latest run.

    python benchmarks/bench_lora_linear.py                  # the issue's full grid (long)
    python benchmarks/bench_lora_linear.py --quick          # the three DESIGN.md target shapes
    python benchmarks/bench_lora_linear.py --cpu-smoke      # tiny, CPU, Triton interpreter (CI)

Without CUDA (and without --cpu-smoke) it prints why and exits with status 0.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import itertools
import os
import sys
import time
from pathlib import Path

import torch  # torch only: lorambo_kernels (which reads TRITON_INTERPRET) is imported lazily
from torch import nn

RESULTS = Path(__file__).resolve().parent / "results"
FIELDS = ["run", "device", "torch", "triton", "peft", "provider", "mode", "dtype", "M", "K", "N", "rank",
          "capacity", "ms_median", "ms_p20", "ms_p80", "peak_mib", "note"]
FULL_M = (512, 2048, 8192)
FULL_KN = ((4096, 4096), (4096, 11008), (11008, 4096))
FULL_RANKS = (8, 16, 64)
QUICK = [(8192, 4096, 4096), (2048, 4096, 4096), (8192, 4096, 11008)]  # DESIGN.md targets, r=16


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="only the DESIGN.md target shapes at r=16 (+ pool case)")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU under TRITON_INTERPRET=1")
    ap.add_argument("--providers", default="base,peft_style,peft,compiled,lorambo")
    ap.add_argument("--modes", default="fwd,fwd_bwd")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--out", type=Path, default=None, help="CSV to append to (default: results/lora_linear.csv; "
                                                          "--cpu-smoke: results/lora_linear_cpu_smoke.csv)")
    ap.add_argument("--no-plot", action="store_true")
    return ap.parse_args(argv)


def cases(args):
    """(M, K, N, rank, capacity) tuples."""
    if args.cpu_smoke:
        return [(8, 32, 48, 4, 4), (8, 32, 48, 4, 16)]
    if args.quick:
        out = [(m, k, n, 16, 16) for m, k, n in QUICK]
        return out + [(8192, 4096, 4096, 8, 8), (8192, 4096, 4096, 8, 128)]
    out = [(m, k, n, r, r) for m, (k, n), r in itertools.product(FULL_M, FULL_KN, FULL_RANKS)]
    return out + [(m, k, n, 8, 128) for m, (k, n) in itertools.product(FULL_M, FULL_KN)]


# -------------------------------------------------------------------------------- providers
def build(provider, k, n, rank, capacity, dtype, device):
    """A module computing the layer, or None when the provider is unavailable here."""
    torch.manual_seed(0)
    base = nn.Linear(k, n, device=device, dtype=dtype).requires_grad_(False)
    if provider == "base":
        return base
    if provider in ("peft_style", "compiled"):
        module = PeftStyleLoRA(base, rank).to(device=device, dtype=dtype)
        return torch.compile(module) if provider == "compiled" else module
    if provider == "peft":
        try:
            import peft
        except ImportError:
            return None
        holder = nn.Sequential(base)
        cfg = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["0"], lora_dropout=0.0)
        model = peft.get_peft_model(holder, cfg).to(device=device, dtype=dtype)
        return model
    if provider == "lorambo":
        import lorambo

        layer = lorambo.LoRAMBoLinear(base, rank=rank, capacity=capacity, alpha=2.0 * rank).to(device=device)
        with torch.no_grad():
            layer.lora_B[:, :rank].normal_(std=0.01)
        return lorambo_module(layer)
    raise ValueError(f"unknown provider {provider!r}")


class PeftStyleLoRA(nn.Module):
    """What peft's LoRA Linear computes in eager mode: base(x) + s * B(A(dropout(x)))."""

    def __init__(self, base, rank):
        super().__init__()
        self.base = base
        self.lora_A = nn.Linear(base.in_features, rank, bias=False)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False)
        nn.init.normal_(self.lora_B.weight, std=0.01)
        self.scaling = 2.0

    def forward(self, x):
        return self.base(x) + self.lora_B(self.lora_A(x)) * self.scaling


class DirectTritonOp(nn.Module):
    """LoRAMBoLinear's pools through lora_linear_triton, for when the dispatch isn't wired yet."""

    note = "direct op call (dispatch not wired)"

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        from lorambo.ops.triton_linear import lora_linear_triton

        lay = self.layer
        return lora_linear_triton(x, lay.weight, lay.bias, lay.lora_A, lay.lora_B, lay.rank, lay.scaling)


def lorambo_module(layer):
    """LoRAMBoLinear on the triton backend (through the dispatch when it routes 'triton')."""
    import lorambo

    lorambo.set_backend("triton")
    try:
        with torch.no_grad():
            layer(torch.zeros(1, layer.in_features, device=layer.lora_A.device, dtype=layer.lora_A.dtype))
    except NotImplementedError:
        return DirectTritonOp(layer)
    return layer


# ------------------------------------------------------------------------------- measuring
def measure(module, mode, m, k, dtype, device, smoke):
    """(median, p20, p80) ms and peak extra MiB of one call of ``mode``."""
    x = torch.randn(m, k, device=device, dtype=dtype, requires_grad=(mode == "fwd_bwd"))
    params = [p for p in module.parameters() if p.requires_grad]
    grad_y = None

    def fwd():
        with torch.no_grad():
            return module(x)

    def fwd_bwd():
        nonlocal grad_y
        y = module(x)
        if grad_y is None:
            grad_y = torch.randn_like(y)
        y.backward(grad_y)

    fn = fwd if mode == "fwd" else fwd_bwd
    fn()  # warm-up: compiles kernels / torch.compile graphs
    if smoke:
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        times.sort()
        return times[1], times[0], times[-1], float("nan")
    import triton.testing

    for p in params + [x]:
        p.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base_mem = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base_mem) / 2**20
    med, p20, p80 = triton.testing.do_bench(fn, grad_to_none=params + [x] if mode == "fwd_bwd" else None,
                                            quantiles=[0.5, 0.2, 0.8])
    return med, p20, p80, peak


def versions(device):
    try:
        import triton
        tv = triton.__version__
    except ImportError:
        tv = "none"
    try:
        import peft
        pv = peft.__version__
    except ImportError:
        pv = "none"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (triton interpreter)"
    return dict(device=name, torch=torch.__version__, triton=tv, peft=pv)


# ----------------------------------------------------------------------------- reporting
def append_csv(path: Path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with path.open("a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=FIELDS)
        if new:
            writer.writeheader()
        writer.writerows(rows)


def latest_run(path: Path):
    with path.open() as fh:
        rows = list(csv.DictReader(fh))
    last = max(r["run"] for r in rows)
    return [r for r in rows if r["run"] == last]


def markdown(rows) -> str:
    """One line per (mode, M, K, N, rank, capacity): each provider's median ms and x base."""
    base = {(r["mode"], r["M"], r["K"], r["N"]): float(r["ms_median"]) for r in rows if r["provider"] == "base"}
    present = {r["provider"] for r in rows}
    providers = [p for p in ("base", "peft_style", "peft", "compiled", "lorambo") if p in present]
    keys = sorted({(r["mode"], int(r["M"]), int(r["K"]), int(r["N"]), int(r["rank"]), int(r["capacity"]))
                   for r in rows if r["provider"] != "base"})
    head = rows[0]
    out = [f"{head['device']}, {head['dtype']}, torch {head['torch']}, triton {head['triton']}, peft {head['peft']} "
           f"(run {head['run']}); do_bench median ms (x frozen nn.Linear)", "",
           "| mode | M | K→N | rank/cap | " + " | ".join(providers) + " |",
           "|---|---|---|---|" + "---|" * len(providers)]
    for mode, m, k, n, rank, cap in keys:
        b = base.get((mode, str(m), str(k), str(n)))
        cells = []
        for p in providers:
            hit = [r for r in rows if r["provider"] == p and r["mode"] == mode and int(r["M"]) == m and int(r["K"]) == k
                   and int(r["N"]) == n and (p == "base" or (int(r["rank"]) == rank and int(r["capacity"]) == cap))]
            if not hit:
                cells.append("–")
                continue
            ms = float(hit[0]["ms_median"])
            cells.append(f"{ms:.3f}" + (f" ({ms / b:.2f}×)" if b and p != "base" else ""))
        out.append(f"| {mode} | {m} | {k}→{n} | {rank}/{cap} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def plot(rows, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = sorted({r["mode"] for r in rows})
    kns = sorted({(int(r["K"]), int(r["N"])) for r in rows})
    fig, axes = plt.subplots(len(modes), len(kns), figsize=(max(7.0, 4.5 * len(kns)), 3.5 * len(modes)),
                             squeeze=False)
    for (i, mode), (j, (k, n)) in itertools.product(enumerate(modes), enumerate(kns)):
        ax = axes[i][j]
        sel = [r for r in rows if r["mode"] == mode and int(r["K"]) == k and int(r["N"]) == n]
        base = {int(r["M"]): float(r["ms_median"]) for r in sel if r["provider"] == "base"}
        series = sorted({(r["provider"], int(r["rank"]), int(r["capacity"])) for r in sel if r["provider"] != "base"})
        for prov, rank, cap in series:
            pts = sorted((int(r["M"]), float(r["ms_median"]) / base[int(r["M"])]) for r in sel
                         if (r["provider"], int(r["rank"]), int(r["capacity"])) == (prov, rank, cap)
                         and int(r["M"]) in base)
            if pts:
                label = f"{prov} r{rank}" + (f"/cap{cap}" if cap != rank else "")
                ax.plot(*zip(*pts), marker="o", label=label)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{mode}  {k}→{n}")
        ax.set_xlabel("M tokens")
        ax.set_ylabel("time / frozen nn.Linear")
    axes[0][-1].legend(fontsize=6)
    fig.suptitle(f"{rows[0]['device']}, {rows[0]['dtype']} (run {rows[0]['run']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    args = parse_args(argv)
    if args.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before lorambo_kernels is imported
    if not args.cpu_smoke and not torch.cuda.is_available():
        print("bench_lora_linear: no CUDA device here, nothing to benchmark "
              "(use --cpu-smoke to exercise the script on CPU under the Triton interpreter)", file=sys.stderr)
        return 0
    try:
        import triton  # noqa: F401
    except ImportError:
        print("bench_lora_linear: triton is not installed; the lorambo kernels need it", file=sys.stderr)
        return 0
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    dtype = torch.float32 if args.cpu_smoke else getattr(torch, args.dtype)
    providers = [p.strip() for p in args.providers.split(",") if p.strip()]
    if args.cpu_smoke and "compiled" in providers:
        providers.remove("compiled")  # inductor's CPU compile takes minutes on a small CI box
    modes = [m.strip() for m in args.modes.split(",")]
    out = args.out or RESULTS / ("lora_linear_cpu_smoke.csv" if args.cpu_smoke else "lora_linear.csv")
    run_id = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    meta = dict(run=run_id, **versions(device))
    rows = []
    for (m, k, n, rank, cap), provider in itertools.product(cases(args), providers):
        if provider != "lorambo" and cap != rank:
            continue  # the pool case only concerns lorambo
        if provider == "base" and any(r["provider"] == "base" and (r["M"], r["K"], r["N"]) == (m, k, n) for r in rows):
            continue
        module = build(provider, k, n, rank, cap, dtype, device)
        if module is None:
            print(f"skip {provider}: not importable", file=sys.stderr)
            continue
        for mode in modes:
            med, p20, p80, peak = measure(module, mode, m, k, dtype, device, args.cpu_smoke)
            row = dict(meta, provider=provider, mode=mode, dtype=str(dtype).replace("torch.", ""), M=m, K=k, N=n,
                       rank=rank, capacity=cap, ms_median=f"{med:.5f}", ms_p20=f"{p20:.5f}", ms_p80=f"{p80:.5f}",
                       peak_mib=f"{peak:.1f}", note=getattr(module, "note", ""))
            rows.append(row)
            print(f"{provider:>10} {mode:>7} M={m} {k}->{n} r={rank}/{cap}: {med:.4f} ms, peak {peak:.1f} MiB",
                  flush=True)
        del module
        if device.type == "cuda":
            torch.cuda.empty_cache()
    append_csv(out, rows)
    latest = latest_run(out)
    md = markdown(latest)
    out.with_suffix(".md").write_text(md)
    print(md)
    if not args.no_plot:
        plot(latest, out.with_suffix(".png"))
    print(f"appended {len(rows)} rows to {out}; wrote {out.with_suffix('.md').name}"
          + ("" if args.no_plot else f" and {out.with_suffix('.png').name}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
