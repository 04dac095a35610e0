"""GPU benchmark of one frozen linear layer with LoRA: lorambo's fused Triton op vs the usual ways.

Providers:  base (frozen nn.Linear, cuBLAS) | peft_style (eager base + B(A(x))*s) | peft (the
            library, when importable) | compiled (torch.compile of peft_style) | lorambo
            (LoRAMBoLinear on the fused Triton kernels; also rank 8 in a capacity-128 pool)
Modes:      fwd, fwd_bwd (input gradient included, base frozen, LoRA parameters trainable)
Metrics:    triton.testing.do_bench median / p20 / p80 (ms); peak extra memory of one call (MiB,
            CUDA allocator); bytes saved for backward (what autograd keeps between forward and
            backward, the input and the parameters not counted)

Cases are labelled; the labels name the speed targets of docs/gpu_check.md:
  large   M=8192, 4096->4096, r=16          mid     M=2048, 4096->4096, r=16
  wide    M=8192, 4096->11008, r=16         decode  M=1, 4096->4096, r=16, forward only
  pool_dense / pool   M=8192, 4096->4096, rank 8 in a capacity-8 / capacity-128 pool (lorambo only)
  grid    the rest of the full sweep

Rows are appended to the CSV as they are measured (with GPU name and versions), so a run cut
short keeps what it measured; then the latest run of each dtype is redrawn as .png and
summarised as .md next to the CSV.

    python benchmarks/bench_lora_linear.py                  # the full grid (long)
    python benchmarks/bench_lora_linear.py --quick          # the target cases (about a minute)
    python benchmarks/bench_lora_linear.py --cpu-smoke      # tiny, CPU, Triton interpreter (CI)
    python benchmarks/bench_lora_linear.py --replot --out results.csv   # redraw .md/.png only

Without CUDA (and without --cpu-smoke) it prints why and exits with status 0. A provider that
fails on a case is reported on stderr, the others go on, and the exit status is 1.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import itertools
import math
import os
import sys
import time
import traceback
from pathlib import Path
from typing import NamedTuple

import torch  # torch only: lorambo_kernels (which reads TRITON_INTERPRET) is imported lazily
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from arg_lists import names_from  # noqa: E402
from providers import PeftStyleLoRA  # noqa: E402
from results_csv import append_rows  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
FIELDS = ["run", "device", "torch", "triton", "peft", "case", "provider", "mode", "dtype", "M", "K", "N", "rank",
          "capacity", "ms_median", "ms_p20", "ms_p80", "peak_mib", "saved_bytes", "note"]
PROVIDERS = ("base", "peft_style", "peft", "compiled", "lorambo")
BOTH = ("fwd", "fwd_bwd")


class Case(NamedTuple):
    label: str
    m: int
    k: int
    n: int
    rank: int
    capacity: int
    modes: tuple = BOTH
    lorambo_only: bool = False  # the pool cases compare lorambo with itself


QUICK = [
    Case("large", 8192, 4096, 4096, 16, 16),
    Case("mid", 2048, 4096, 4096, 16, 16),
    Case("wide", 8192, 4096, 11008, 16, 16),
    Case("pool_dense", 8192, 4096, 4096, 8, 8, lorambo_only=True),
    Case("pool", 8192, 4096, 4096, 8, 128, lorambo_only=True),
    Case("decode", 1, 4096, 4096, 16, 16, ("fwd",)),
]
# The same labels at interpreter sizes: every code path of a GPU run, seconds on a CPU.
SMOKE = [
    Case("large", 16, 32, 32, 4, 4, ("fwd_bwd",)),
    Case("mid", 8, 32, 32, 4, 4, ("fwd_bwd",)),
    Case("wide", 16, 32, 48, 4, 4, ("fwd_bwd",)),
    Case("pool_dense", 16, 32, 32, 2, 2, ("fwd_bwd",), True),
    Case("pool", 16, 32, 32, 2, 16, ("fwd_bwd",), True),
    Case("decode", 1, 32, 32, 4, 4, ("fwd",)),
]
FULL_M = (512, 2048, 8192)
FULL_KN = ((4096, 4096), (4096, 11008), (11008, 4096))
FULL_RANKS = (8, 16, 64)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="only the labelled target cases")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU under TRITON_INTERPRET=1")
    ap.add_argument("--providers", type=names_from(PROVIDERS), default=",".join(PROVIDERS),
                    help=f"comma-separated, of {','.join(PROVIDERS)}")
    ap.add_argument("--modes", type=names_from(BOTH), default=",".join(BOTH),
                    help="modes to run, of fwd,fwd_bwd (each case also lists its own)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--out", type=Path, default=None, help="CSV to append to (default: results/lora_linear.csv; "
                                                          "--cpu-smoke: results/lora_linear_cpu_smoke.csv)")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--replot", action="store_true", help="only rewrite .md/.png from the CSV (no measurements)")
    return ap.parse_args(argv)


def cases(args) -> list[Case]:
    if args.cpu_smoke:
        return SMOKE
    if args.quick:
        return QUICK
    labelled = {(c.m, c.k, c.n, c.rank, c.capacity) for c in QUICK}
    grid = [Case("grid", m, k, n, r, r) for m, (k, n), r in itertools.product(FULL_M, FULL_KN, FULL_RANKS)]
    grid += [Case("grid", m, k, n, 8, 128, lorambo_only=True) for m, (k, n) in itertools.product(FULL_M, FULL_KN)]
    return QUICK + [c for c in grid if (c.m, c.k, c.n, c.rank, c.capacity) not in labelled]


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
        cfg = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["0"], lora_dropout=0.0)
        model = peft.get_peft_model(nn.Sequential(base), cfg).to(device=device, dtype=dtype)
        with torch.no_grad():  # peft starts B at zero; real values keep the products honest
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(std=0.01)
        return model
    if provider == "lorambo":
        import lorambo

        layer = lorambo.LoRAMBoLinear(base, rank=rank, capacity=capacity, alpha=2.0 * rank).to(device=device)
        with torch.no_grad():
            layer.lora_B[:, :rank].normal_(std=0.01)
        return layer
    raise ValueError(f"unknown provider {provider!r}")


# ------------------------------------------------------------------------------- measuring
def saved_for_backward(forward, exclude, device):
    """(output of ``forward()``, bytes on ``device`` autograd saved for backward meanwhile), each
    storage counted once and the storages in ``exclude`` (input, parameters) not at all. Host
    tensors on a GPU run (a 0-d dropout seed) take no device memory and are not counted."""
    seen = {}

    def pack(t):
        try:
            storage = t.untyped_storage()
            if t.device == device and storage.data_ptr() not in exclude:
                seen[storage.data_ptr()] = storage.nbytes()
        except (RuntimeError, NotImplementedError):  # a tensor without plain storage
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    return out, sum(seen.values())


def measure(module, mode, m, k, dtype, device, smoke):
    """dict of median / p20 / p80 ms, peak extra MiB and bytes saved for backward of one call.

    fwd_bwd: the first (warm-up) call also counts the bytes saved for backward; in ``smoke``
    (the interpreter, seconds per call) that call is the one timed."""
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

    saved = -1  # not measured
    t0 = time.perf_counter()
    if mode == "fwd_bwd":  # warm-up (kernel compiles) that also counts the bytes saved
        exclude = {t.untyped_storage().data_ptr() for t in [x, *module.parameters(), *module.buffers()]}
        try:
            y, saved = saved_for_backward(lambda: module(x), exclude, x.device)
        except RuntimeError as err:  # torch.compile may refuse saved-tensor hooks
            print(f"  saved-for-backward not measured: {err}", file=sys.stderr)
            y = module(x)
        grad_y = torch.randn_like(y)
        y.backward(grad_y)
        del y
    else:
        fwd()  # warm-up: compiles kernels / torch.compile graphs
    if smoke:
        ms = (time.perf_counter() - t0) * 1e3
        return dict(med=ms, p20=ms, p80=ms, peak=float("nan"), saved=saved)
    fn = fwd if mode == "fwd" else fwd_bwd
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
    return dict(med=med, p20=p20, p80=p80, peak=peak, saved=saved)


def versions(device):
    from importlib import metadata

    def version(name):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "none"

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (triton interpreter)"
    return dict(device=name, torch=torch.__version__, triton=version("triton"), peft=version("peft"))


# ----------------------------------------------------------------------------- reporting
def latest_runs(path: Path):
    """The rows of the latest run of each dtype (a bf16 and an fp16 run side by side), on the
    device of the latest run: a CSV that also holds runs from another GPU must not set that
    GPU's numbers beside this one's under one title."""
    if not path.exists():
        raise SystemExit(f"bench_lora_linear: {path} does not exist; nothing to redraw")
    with path.open() as fh:
        rows = list(csv.DictReader(fh))
    if not rows:  # before the .md is rewritten: an empty summary must not replace a real one
        raise SystemExit(f"bench_lora_linear: {path} holds no rows; nothing to redraw")
    device = max(rows, key=lambda r: r["run"])["device"]
    rows = [r for r in rows if r["device"] == device]
    out = []
    for dtype in sorted({r["dtype"] for r in rows}):
        last = max(r["run"] for r in rows if r["dtype"] == dtype)
        out += [r for r in rows if r["dtype"] == dtype and r["run"] == last]
    return out


def _fmt(value: str, digits=3) -> str:
    v = float(value)
    return "–" if math.isnan(v) else f"{v:.{digits}f}"


def _kib(nbytes: str) -> str:
    return "–" if int(nbytes) < 0 else f"{int(nbytes) / 1024:.1f}"


def markdown(rows) -> str:
    return "\n".join(markdown_one([r for r in rows if r["dtype"] == d]) for d in sorted({r["dtype"] for r in rows}))


def markdown_one(rows) -> str:
    """One line per (mode, case shape): each provider's median ms and × base; then memory."""
    base = {(r["mode"], r["M"], r["K"], r["N"]): float(r["ms_median"]) for r in rows if r["provider"] == "base"}
    present = {r["provider"] for r in rows}
    providers = [p for p in PROVIDERS if p in present]
    keys = sorted({(r["mode"], int(r["M"]), int(r["K"]), int(r["N"]), int(r["rank"]), int(r["capacity"]))
                   for r in rows if r["provider"] != "base"})
    head = rows[0]
    out = [f"{head['device']}, {head['dtype']}, torch {head['torch']}, triton {head['triton']}, peft {head['peft']} "
           f"(run {head['run']}); do_bench median ms (x frozen nn.Linear)", "",
           "| mode | M | K→N | rank/cap | " + " | ".join(providers) + " |",
           "|---|---|---|---|" + "---|" * len(providers)]

    def hit(p, mode, m, k, n, rank, cap):
        return [r for r in rows if r["provider"] == p and r["mode"] == mode and int(r["M"]) == m and int(r["K"]) == k
                and int(r["N"]) == n and (p == "base" or (int(r["rank"]) == rank and int(r["capacity"]) == cap))]

    for mode, m, k, n, rank, cap in keys:
        b = base.get((mode, str(m), str(k), str(n)))
        cells = []
        for p in providers:
            found = hit(p, mode, m, k, n, rank, cap)
            if not found:
                cells.append("–")
                continue
            ms = float(found[0]["ms_median"])
            cells.append(f"{ms:.3f}" + (f" ({ms / b:.2f}×)" if b and p != "base" else ""))
        out.append(f"| {mode} | {m} | {k}→{n} | {rank}/{cap} | " + " | ".join(cells) + " |")
    mem = [r for r in rows if r["mode"] == "fwd_bwd" and r["provider"] != "base"]
    if mem:
        out += ["", "fwd_bwd memory: saved for backward (KiB; input and parameters not counted) / "
                "peak extra of one call (MiB)", "", "| M | K→N | rank/cap | provider | saved KiB | peak MiB |",
                "|---|---|---|---|---|---|"]
        for r in sorted(mem, key=lambda r: (int(r["M"]), int(r["K"]), int(r["N"]), int(r["rank"]),
                                            int(r["capacity"]), PROVIDERS.index(r["provider"]))):
            out.append(f"| {r['M']} | {r['K']}→{r['N']} | {r['rank']}/{r['capacity']} | {r['provider']} | "
                       f"{_kib(r['saved_bytes'])} | {_fmt(r['peak_mib'], 1)} |")
    return "\n".join(out) + "\n"


def plot(rows, path: Path):
    """Lines over M for a grid run; bars per labelled case otherwise (--quick, --cpu-smoke)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if any(r["case"] == "grid" for r in rows):
        plot_grid(rows, path, plt)
    else:
        plot_cases(rows, path, plt)


def plot_cases(rows, path: Path, plt):
    """Time / frozen layer of each provider (and dtype) for each labelled case and mode."""
    base = {(r["dtype"], r["mode"], r["M"], r["K"], r["N"]): float(r["ms_median"]) for r in rows
            if r["provider"] == "base"}
    order = [c.label for c in QUICK]
    groups = sorted({(r["mode"], r["case"]) for r in rows if r["provider"] != "base"},
                    key=lambda g: (g[0], order.index(g[1]) if g[1] in order else len(order)))
    series = sorted({(r["provider"], r["dtype"]) for r in rows if r["provider"] != "base"},
                    key=lambda s: (PROVIDERS.index(s[0]), s[1]))
    fig, ax = plt.subplots(figsize=(max(7.0, 1.2 * len(groups) * max(1, len(series)) ** 0.5), 4.5))
    width = 0.8 / max(1, len(series))
    for i, (prov, dtype) in enumerate(series):
        xs, ys = [], []
        for j, (mode, case) in enumerate(groups):
            hit = [r for r in rows if (r["provider"], r["dtype"], r["mode"], r["case"]) == (prov, dtype, mode, case)]
            b = hit and base.get((dtype, mode, hit[-1]["M"], hit[-1]["K"], hit[-1]["N"]))
            if b:
                xs.append(j + (i - (len(series) - 1) / 2) * width)
                ys.append(float(hit[-1]["ms_median"]) / b)
        ax.bar(xs, ys, width, label=f"{prov} {dtype}", hatch="" if dtype != "float16" else "//")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_yscale("log")
    ax.set_xticks(range(len(groups)), [f"{case}\n{mode}" for mode, case in groups], fontsize=7)
    ax.set_ylabel("time / frozen nn.Linear (log)")
    ax.legend(fontsize=6)
    ax.set_title(f"{rows[0]['device']}: lorambo and peft-style LoRA over the frozen layer", fontsize=9)
    fig.tight_layout()
    _save_figure(fig, path, plt)


def plot_grid(rows, path: Path, plt):
    modes = sorted({r["mode"] for r in rows})
    kns = sorted({(int(r["K"]), int(r["N"])) for r in rows})
    fig, axes = plt.subplots(len(modes), len(kns), figsize=(max(7.0, 4.5 * len(kns)), 3.5 * len(modes)),
                             squeeze=False)
    for (i, mode), (j, (k, n)) in itertools.product(enumerate(modes), enumerate(kns)):
        ax = axes[i][j]
        sel = [r for r in rows if r["mode"] == mode and int(r["K"]) == k and int(r["N"]) == n]
        base = {(r["dtype"], int(r["M"])): float(r["ms_median"]) for r in sel if r["provider"] == "base"}
        series = sorted({(r["dtype"], r["provider"], int(r["rank"]), int(r["capacity"]))
                         for r in sel if r["provider"] != "base"})
        for dtype, prov, rank, cap in series:
            pts = sorted((int(r["M"]), float(r["ms_median"]) / base[dtype, int(r["M"])]) for r in sel
                         if (r["dtype"], r["provider"], int(r["rank"]), int(r["capacity"])) == (dtype, prov, rank, cap)
                         and (dtype, int(r["M"])) in base)
            if pts:
                label = f"{prov} r{rank}" + (f"/cap{cap}" if cap != rank else "") + f" {dtype}"
                ax.plot(*zip(*pts), marker="o", ls="-" if dtype == "bfloat16" else "--", label=label)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{mode}  {k}→{n}")
        ax.set_xlabel("M tokens")
        ax.set_ylabel("time / frozen nn.Linear")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=5)
    dtypes = ", ".join(sorted({r["dtype"] for r in rows}))
    fig.suptitle(f"{rows[0]['device']}, {dtypes} (latest run of each dtype)", fontsize=9)
    fig.tight_layout()
    _save_figure(fig, path, plt)


def _save_figure(fig, path: Path, plt) -> None:
    from lorambo.adapters.atomic import atomic_save_figure  # after the measurements: see the torch import

    try:
        atomic_save_figure(fig, path, dpi=110)
    finally:
        plt.close(fig)


def report(out: Path, plot_too: bool) -> None:
    """Rewrite the .md (and .png) next to ``out`` from the CSV's latest runs (each file atomically)."""
    from lorambo.adapters.atomic import atomic_write_text

    latest = latest_runs(out)
    md = markdown(latest)
    atomic_write_text(out.with_suffix(".md"), md)
    print(md)
    if plot_too:
        plot(latest, out.with_suffix(".png"))


# ----------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    args = parse_args(argv)
    out = args.out or RESULTS / ("lora_linear_cpu_smoke.csv" if args.cpu_smoke else "lora_linear.csv")
    if args.replot:
        report(out, not args.no_plot)
        return 0
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
    import lorambo

    lorambo.set_backend("triton")  # before any layer exists: the dispatch is resolved once
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    dtype = torch.float32 if args.cpu_smoke else getattr(torch, args.dtype)
    providers = list(args.providers)
    if args.cpu_smoke and "compiled" in providers:
        providers.remove("compiled")  # inductor's CPU compile takes minutes on a small CI box
    modes = set(args.modes)
    run_id = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    meta = dict(run=run_id, **versions(device))
    measured, failures = set(), 0
    for case, provider in itertools.product(cases(args), providers):
        if case.lorambo_only and provider != "lorambo":
            continue
        if provider == "base" and (case.m, case.k, case.n) in measured:
            continue  # one frozen-layer row per shape
        try:
            module = build(provider, case.k, case.n, case.rank, case.capacity, dtype, device)
            if module is None:
                print(f"skip {provider}: not importable", file=sys.stderr)
                continue
            for mode in [md for md in case.modes if md in modes]:
                res = measure(module, mode, case.m, case.k, dtype, device, args.cpu_smoke)
                row = dict(meta, case=case.label, provider=provider, mode=mode, dtype=str(dtype).replace("torch.", ""),
                           M=case.m, K=case.k, N=case.n, rank=case.rank, capacity=case.capacity,
                           ms_median=f"{res['med']:.5f}", ms_p20=f"{res['p20']:.5f}", ms_p80=f"{res['p80']:.5f}",
                           peak_mib=f"{res['peak']:.1f}", saved_bytes=res["saved"], note="")
                append_rows(out, FIELDS, [row])  # row by row: a run cut short keeps what it measured
                print(f"{provider:>10} {mode:>7} {case.label:>10} M={case.m} {case.k}->{case.n} "
                      f"r={case.rank}/{case.capacity}: {res['med']:.4f} ms, peak {res['peak']:.1f} MiB, "
                      f"saved {res['saved'] / 1024:.1f} KiB", flush=True)
            if provider == "base":
                measured.add((case.m, case.k, case.n))
        except Exception:  # noqa: BLE001 - one broken provider must not hide the others' numbers
            failures += 1
            print(f"FAILED {provider} on {case}:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        module = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if out.exists():
        report(out, not args.no_plot)
        print(f"appended rows to {out}; wrote {out.with_suffix('.md').name}"
              + ("" if args.no_plot else f" and {out.with_suffix('.png').name}"))
    if failures:
        print(f"bench_lora_linear: {failures} provider/case combination(s) failed (see above)", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
