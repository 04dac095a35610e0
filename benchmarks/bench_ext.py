"""Benchmark the compiled extension (lorambo._C) against the paths it replaces.

Sections (``--sections``, default all; a section that fails is reported, the others go on, and
the exit status is 1):
  lora     CPU LoRA linear, fwd and fwd+bwd (input gradient included, base frozen, LoRA trainable):
           ext (lorambo::lora_linear) vs the reference op, a peft-style eager LoRA and the frozen
           nn.Linear, at M in {64, 512, 2048}, K=N in {768, 2048}, r in {8, 64}, float32.
  reduce   per-tensor dot products / squared norms over a 7B-like set of 224 LoRA-targeted tensors
           (32 layers x q,k,v,o,gate,up,down; each tensor holds a rank-16 adapter's r*(d+k)
           elements): ext (multi_dot / multi_sq_norm) vs a Python loop and torch._foreach_*
           (lorambo.sensitivity.reductions).
  probes   Rademacher probes for the same 224 tensors: ext (probe_fill_) vs one seeded
           torch.Generator per layer (lorambo.sensitivity.probes.rademacher).
  pool     keep_components on 224 pools (capacity 32, 1024 wide) with Adam moments: ext
           (one pool_remap_) vs the per-layer Python path (index_select + copy + zero).
  adamw    one lorambo.optim.AdamW step on the same 224 pools, rank 16 active: ext (one
           pool_adamw_) vs its torch._foreach path, and torch's AdamW on the whole pools.

Timing: providers are interleaved round by round (the machine may be shared), median and
20th/80th percentiles of wall time per call; CUDA runs synchronise. Rows are appended to
benchmarks/results/ext_<device>.csv with the CPU/GPU name, thread count and versions; the
latest run is redrawn as .png and summarised as .md next to it.

    python benchmarks/bench_ext.py                          # everything on CPU (~5 min on 2 cores)
    python benchmarks/bench_ext.py --sections reduce --device cuda
    python benchmarks/bench_ext.py --quick                  # a smoke run (seconds)
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import itertools
import random
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from arg_lists import names_from, positive  # noqa: E402
from machine import device_model  # noqa: E402
from providers import PeftStyleLoRA  # noqa: E402
from results_csv import append_rows  # noqa: E402

from lorambo.adapters.atomic import atomic_save_figure, atomic_write_text  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
FIELDS = ["run", "device", "threads", "torch", "section", "case", "provider", "mode", "dtype", "M", "K", "N",
          "rank", "ms_median", "ms_p20", "ms_p80", "rounds"]
SECTIONS = ("lora", "reduce", "probes", "pool", "adamw")
SEVEN_B = [(4096, 4096)] * 4 + [(11008, 4096)] * 2 + [(4096, 11008)]  # q,k,v,o,gate,up,down (out, in)


# ----------------------------------------------------------------------------- timing
def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def interleaved(fns: dict, device, budget_s: float, min_rounds=5, max_rounds=60, warmup=2):
    """{name: (median, p20, p80, rounds)} in ms; one call of each provider per round, random order."""
    per_call = {}
    for name, fn in fns.items():
        for _ in range(warmup):
            start = time.perf_counter()
            fn()
            _sync(device)
            per_call[name] = time.perf_counter() - start
    rounds = int(min(max_rounds, max(min_rounds, budget_s / max(sum(per_call.values()), 1e-6))))
    times = {name: [] for name in fns}
    names = list(fns)
    for _ in range(rounds):
        random.shuffle(names)
        for name in names:
            _sync(device)
            start = time.perf_counter()
            fns[name]()
            _sync(device)
            times[name].append((time.perf_counter() - start) * 1e3)
    out = {}
    for name, ts in times.items():
        q = statistics.quantiles(ts, n=5) if len(ts) >= 5 else [min(ts)] * 4
        out[name] = (statistics.median(ts), q[0], q[3], rounds)
    return out


# ------------------------------------------------------------------------------ LoRA
def lora_section(args, device, meta):
    from lorambo.ops.ext_linear import lora_linear_ext
    from lorambo.ops.lora_linear_ref import lora_linear_reference

    ms = (64,) if args.quick else (64, 512, 2048)
    kns = (768,) if args.quick else (768, 2048)
    ranks = (8,) if args.quick else (8, 64)
    rows = []
    for m, k, r in itertools.product(ms, kns, ranks):
        n, s = k, 2.0
        base = nn.Linear(k, n, device=device).requires_grad_(False)
        a = (torch.randn(r, k, device=device) / k**0.5).requires_grad_()
        b = (torch.randn(n, r, device=device) * 0.01).requires_grad_()
        peft = PeftStyleLoRA(base, r, s, a.detach(), b.detach())
        x = torch.randn(m, k, device=device)
        xg = x.clone().requires_grad_()
        g = torch.randn(m, n, device=device)
        w, bias = base.weight, base.bias
        params = (xg, a, b, *peft.parameters())

        def clear():
            for p in params:
                p.grad = None

        calls = {
            "base": lambda inp: base(inp),
            "peft_style": lambda inp: peft(inp),
            "reference": lambda inp: lora_linear_reference(inp, w, bias, a, b, r, s),
            "ext": lambda inp: lora_linear_ext(inp, w, bias, a, b, r, s),
        }
        for mode in args.modes:
            if mode == "fwd":
                def make(call):
                    def run():
                        with torch.no_grad():
                            call(x)
                    return run
            else:
                def make(call):
                    def run():
                        call(xg).backward(g)
                        clear()
                    return run
            res = interleaved({name: make(call) for name, call in calls.items()}, device, args.budget)
            for name, (med, p20, p80, rounds) in res.items():
                rows.append(dict(meta, section="lora", case=f"M{m}_K{k}_r{r}", provider=name, mode=mode,
                                 dtype="float32", M=m, K=k, N=n, rank=r, ms_median=f"{med:.4f}", ms_p20=f"{p20:.4f}",
                                 ms_p80=f"{p80:.4f}", rounds=rounds))
            line = "  ".join(f"{name} {res[name][0]:.3f}" for name in calls)
            print(f"lora {mode:>7} M={m:<5} K=N={k:<5} r={r:<3} ms: {line}  "
                  f"(peft/ext {res['peft_style'][0] / res['ext'][0]:.2f}x)", flush=True)
    return rows


# ------------------------------------------------------------------------- reductions
def seven_b_tensors(device, dtype, rank=16, scale=1):
    """224 tensors, one per adapted module of a 7B-like model, each with r*(d+k) elements."""
    return [torch.randn(rank, (o + i) // scale, device=device).to(dtype) for _ in range(32) for o, i in SEVEN_B]


def torch_path(fn, *args):
    """``fn`` on its PyTorch (``_foreach``) path: under ``auto`` it would run the extension."""
    import lorambo

    lorambo.set_backend("torch")
    try:
        return fn(*args)
    finally:
        lorambo.set_backend(None)


def reduce_section(args, device, meta):
    from lorambo.ext import ops as ext_ops
    from lorambo.sensitivity.reductions import per_layer_dots, per_layer_sq_norms

    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        xs = seven_b_tensors(device, dtype, scale=8 if args.quick else 1)
        ys = [torch.randn_like(x) for x in xs]
        xs1, ys1 = [x.view(1, -1) for x in xs], [y.view(1, -1) for y in ys]
        numel = sum(x.numel() for x in xs)
        cases = {
            "dot": {
                "python_loop": lambda: torch.stack([(x * y).sum(dtype=torch.float64) for x, y in zip(xs, ys)]),
                "foreach": lambda: torch_path(per_layer_dots, xs1, ys1),
                "ext": lambda: ext_ops.multi_dot(xs, ys),
            },
            "sq_norm": {
                "python_loop": lambda: torch.stack([x.float().square().sum(dtype=torch.float64) for x in xs]),
                "foreach": lambda: torch_path(per_layer_sq_norms, xs),
                "ext": lambda: ext_ops.multi_sq_norm(xs),
            },
        }
        for case, fns in cases.items():
            res = interleaved(fns, device, args.budget)
            name = str(dtype).replace("torch.", "")
            for prov, (med, p20, p80, rounds) in res.items():
                rows.append(dict(meta, section="reduce", case=f"{case}_224", provider=prov, mode=case, dtype=name,
                                 M=len(xs), K=numel, N="", rank=16, ms_median=f"{med:.4f}", ms_p20=f"{p20:.4f}",
                                 ms_p80=f"{p80:.4f}", rounds=rounds))
            print(f"reduce {case:>7} {name:>8} 224 tensors, {numel / 1e6:.1f}M elements, ms: "
                  + "  ".join(f"{p} {res[p][0]:.3f}" for p in fns)
                  + f"  (loop/ext {res['python_loop'][0] / res['ext'][0]:.1f}x, "
                    f"foreach/ext {res['foreach'][0] / res['ext'][0]:.1f}x)", flush=True)
    return rows


def probes_section(args, device, meta):
    from lorambo.ext import loader as ext_loader
    from lorambo.sensitivity.probes import rademacher

    ext_loader.require()  # registers torch.ops.lorambo

    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        ts = seven_b_tensors(device, dtype, scale=8 if args.quick else 1)
        offsets = [i << 40 for i in range(len(ts))]  # one stream region per tensor
        fns = {
            "python_loop": lambda: [rademacher(t.shape, 0, i, "hutchinson", 0, dtype=dtype, device=device)
                                    for i, t in enumerate(ts)],
            "ext": lambda: torch.ops.lorambo.probe_fill_(ts, 0, offsets, "rademacher"),
        }
        res = interleaved(fns, device, args.budget)
        name = str(dtype).replace("torch.", "")
        for prov, (med, p20, p80, rounds) in res.items():
            rows.append(dict(meta, section="probes", case="rademacher_224", provider=prov, mode="fill", dtype=name,
                             M=len(ts), K=sum(t.numel() for t in ts), N="", rank=16, ms_median=f"{med:.4f}",
                             ms_p20=f"{p20:.4f}", ms_p80=f"{p80:.4f}", rounds=rounds))
        print(f"probes rademacher {name:>8} ms: " + "  ".join(f"{p} {res[p][0]:.3f}" for p in fns)
              + f"  (loop/ext {res['python_loop'][0] / res['ext'][0]:.1f}x)", flush=True)
    return rows


def pool_section(args, device, meta):
    from types import SimpleNamespace

    from lorambo.ext import ops as ext_ops
    from lorambo.nn.optimizer_state import gather_slot_state

    n_layers, width, cap, rank = (16, 256, 32, 16) if args.quick else (224, 1024, 32, 16)
    layers = [SimpleNamespace(lora_A=nn.Parameter(torch.randn(cap, width, device=device)),
                              lora_B=nn.Parameter(torch.randn(width, cap, device=device)))
              for _ in range(n_layers)]
    opt = torch.optim.Adam([p for l in layers for p in (l.lora_A, l.lora_B)])
    for l in layers:
        l.lora_A.grad, l.lora_B.grad = torch.randn_like(l.lora_A), torch.randn_like(l.lora_B)
    opt.step()
    keep = list(range(rank - 1, -1, -2))  # keep every other active slot, reversed

    @torch.no_grad()
    def python_loop():
        for l in layers:  # LoRAMBoLinear.keep_components + gather_slot_state, per layer
            index = torch.as_tensor(keep, dtype=torch.long, device=device)
            l.lora_A[: len(keep)] = l.lora_A.index_select(0, index)
            l.lora_B[:, : len(keep)] = l.lora_B.index_select(1, index)
            l.lora_A[len(keep):rank].zero_()
            l.lora_B[:, len(keep):rank].zero_()
            gather_slot_state(opt, l, keep, rank)

    the_map = ext_ops.keep_map(keep, rank, cap)
    res = interleaved({"python_loop": python_loop,
                       "ext": lambda: ext_ops.remap_pools_([(l, the_map) for l in layers], opt)}, device, args.budget)
    rows = []
    for prov, (med, p20, p80, rounds) in res.items():
        rows.append(dict(meta, section="pool", case=f"keep_components_{n_layers}", provider=prov, mode="remap",
                         dtype="float32", M=n_layers, K=width, N=cap, rank=rank, ms_median=f"{med:.4f}",
                         ms_p20=f"{p20:.4f}", ms_p80=f"{p80:.4f}", rounds=rounds))
    print(f"pool keep_components {n_layers} layers (+Adam moments) ms: python_loop {res['python_loop'][0]:.3f}  "
          f"ext {res['ext'][0]:.3f}  (loop/ext {res['python_loop'][0] / res['ext'][0]:.1f}x)", flush=True)
    return rows


def adamw_section(args, device, meta):
    import lorambo

    n_layers, width, cap, rank = (16, 256, 32, 16) if args.quick else (224, 1024, 32, 16)

    def pools():
        layers = [lorambo.LoRAMBoLinear(nn.Linear(width, width, device=device), rank=rank, capacity=cap)
                  for _ in range(n_layers)]
        params = [p for layer in layers for p in (layer.lora_A, layer.lora_B)]
        for p in params:
            p.grad = torch.randn_like(p)
        return params

    def stepper(opt, backend):
        def run():
            lorambo.set_backend(backend)
            try:
                opt.step()
            finally:
                lorambo.set_backend(None)
        return run

    steps = {"ext": stepper(lorambo.optim.AdamW(pools(), lr=1e-3), "ext"),
             "foreach": stepper(lorambo.optim.AdamW(pools(), lr=1e-3), "torch"),
             "torch_whole_pool": stepper(torch.optim.AdamW(pools(), lr=1e-3), None)}
    res = interleaved(steps, device, args.budget)
    rows = [dict(meta, section="adamw", case=f"adamw_step_{n_layers}", provider=prov, mode="step", dtype="float32",
                 M=n_layers, K=width, N=cap, rank=rank, ms_median=f"{med:.4f}", ms_p20=f"{p20:.4f}",
                 ms_p80=f"{p80:.4f}", rounds=rounds) for prov, (med, p20, p80, rounds) in res.items()]
    print(f"adamw step {n_layers} pools ms: foreach {res['foreach'][0]:.3f}  torch_whole_pool "
          f"{res['torch_whole_pool'][0]:.3f}  ext {res['ext'][0]:.3f}  "
          f"(foreach/ext {res['foreach'][0] / res['ext'][0]:.1f}x)", flush=True)
    return rows


# ---------------------------------------------------------------------------- reporting
def latest_run(path: Path, device: str | None = None):
    """Rows of the latest run for each thread count on ``device`` (1- and 2-thread runs side by
    side); by default the device of the CSV's latest run, so a CSV measured on another machine
    (a GPU's, a colleague's CPU) redraws anywhere."""
    if not path.exists():
        raise SystemExit(f"bench_ext: {path} does not exist; nothing to redraw")
    with path.open() as fh:
        rows = list(csv.DictReader(fh))
    if device is None and rows:
        device = max(rows, key=lambda r: r["run"])["device"]
    rows = [r for r in rows if r["device"] == device]
    if not rows:
        raise SystemExit(f"bench_ext: {path} holds no rows measured on {device!r}")
    out = []
    for threads in sorted({r["threads"] for r in rows}, key=int):
        sel = [r for r in rows if r["threads"] == threads]
        last = max(r["run"] for r in sel)
        out += [r for r in sel if r["run"] == last]
    return out


def markdown(rows) -> str:
    return "\n".join(markdown_one([r for r in rows if r["threads"] == t])
                     for t in sorted({r["threads"] for r in rows}, key=int))


def markdown_one(rows) -> str:
    head = rows[0]
    out = [f"**{head['device']}, {head['threads']} thread(s)**, torch {head['torch']} (run {head['run']}); "
           "median ms per call, providers interleaved", ""]
    lora = [r for r in rows if r["section"] == "lora"]
    if lora:
        out += ["| mode | M | K=N | r | base | peft_style | reference | ext | peft_style / ext |",
                "|---|---|---|---|---|---|---|---|---|"]
        keys = sorted({(r["mode"], int(r["M"]), int(r["K"]), int(r["rank"])) for r in lora})
        for mode, m, k, rank in keys:
            sel = {r["provider"]: r for r in lora
                   if (r["mode"], int(r["M"]), int(r["K"]), int(r["rank"])) == (mode, m, k, rank)}
            cells = [f"{float(sel[p]['ms_median']):.3f}" if p in sel else "–"
                     for p in ("base", "peft_style", "reference", "ext")]
            ratio = float(sel["peft_style"]["ms_median"]) / float(sel["ext"]["ms_median"])
            out.append(f"| {mode} | {m} | {k} | {rank} | " + " | ".join(cells) + f" | {ratio:.2f}× |")
        out.append("")
    other = [r for r in rows if r["section"] != "lora"]
    if other:
        out += ["| section | case | dtype | provider | ms | vs ext |", "|---|---|---|---|---|---|"]
        key = lambda r: (r["section"], r["case"], r["dtype"])  # noqa: E731
        for (section, case, dtype), grp in itertools.groupby(other, key=key):
            grp = list(grp)
            ext = next((float(r["ms_median"]) for r in grp if r["provider"] == "ext"), None)
            for r in grp:
                ms = float(r["ms_median"])
                out.append(f"| {section} | {case} | {dtype} | {r['provider']} | {ms:.3f} | "
                           + (f"{ms / ext:.1f}×" if ext else "–") + " |")
    return "\n".join(out) + "\n"


def plot(rows, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lora = [r for r in rows if r["section"] == "lora"]
    other = [r for r in rows if r["section"] != "lora"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 6.5))
    if lora:
        ax = axes[0]
        series = sorted({(r["threads"], r["mode"], int(r["K"]), int(r["rank"])) for r in lora})
        for threads, mode, k, rank in series:
            sel = [r for r in lora
                   if (r["threads"], r["mode"], int(r["K"]), int(r["rank"])) == (threads, mode, k, rank)]
            by_m = {}
            for r in sel:
                by_m.setdefault(int(r["M"]), {})[r["provider"]] = float(r["ms_median"])
            pts = sorted((m, v["peft_style"] / v["ext"]) for m, v in by_m.items() if "ext" in v and "peft_style" in v)
            if pts:
                ax.plot(*zip(*pts), marker="o", ls="-" if threads == "1" else "--",
                        label=f"{threads}t {mode} K=N={k} r={rank}")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("M tokens")
        ax.set_ylabel("peft-style time / ext time (>1: ext faster)")
        ax.set_title("CPU LoRA linear, float32")
        ax.legend(fontsize=6)
    if other:
        ax = axes[1]
        labels, speedups = [], []
        key = lambda r: (r["threads"], r["section"], r["case"], r["dtype"])  # noqa: E731
        for (threads, section, case, dtype), grp in itertools.groupby(other, key=key):
            grp = {r["provider"]: float(r["ms_median"]) for r in grp}
            for prov, ms in grp.items():
                if prov != "ext" and "ext" in grp:
                    labels.append(f"{threads}t {case} {dtype} vs {prov}")
                    speedups.append(ms / grp["ext"])
        ax.barh(range(len(labels)), speedups)
        ax.set_yticks(range(len(labels)), labels, fontsize=6)
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("time / ext time (>1: ext faster)")
        ax.set_title("multi-tensor ops, 224 tensors")
    fig.suptitle(f"{rows[0]['device']}, latest run per thread count (solid: 1 thread)", fontsize=9)
    fig.tight_layout()
    try:
        atomic_save_figure(fig, path, dpi=110)
    finally:
        plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sections", type=names_from(SECTIONS), default=",".join(SECTIONS),
                    help=f"comma-separated, of {','.join(SECTIONS)}")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--modes", type=names_from(("fwd", "fwd_bwd")), default="fwd,fwd_bwd",
                    help="modes of the lora section, of fwd,fwd_bwd")
    ap.add_argument("--budget", type=positive(float), default=4.0, help="seconds of timed rounds per case (default 4)")
    ap.add_argument("--quick", action="store_true", help="small shapes, for a smoke run")
    ap.add_argument("--threads", type=positive(), default=None,
                    help="torch.set_num_threads before measuring (default: torch's choice). On a shared "
                         "machine 1 thread avoids OpenMP barriers waiting on descheduled threads")
    ap.add_argument("--out", type=Path, default=None, help="CSV to append to (default results/ext_<device>.csv)")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--replot", action="store_true",
                    help="only redraw .png/.md from the CSV's latest run (measured on any machine)")
    args = ap.parse_args(argv)
    from lorambo.ext import ops as ext_ops

    if args.replot:
        out = args.out or RESULTS / f"ext_{args.device}.csv"
        latest = latest_run(out)
        atomic_write_text(out.with_suffix(".md"), markdown(latest))
        plot(latest, out.with_suffix(".png"))
        return 0
    if not ext_ops.available():
        print("bench_ext: the compiled extension lorambo._C is not built; nothing to benchmark", file=sys.stderr)
        return 0
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_ext: no CUDA device here", file=sys.stderr)
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    random.seed(0)
    run_id = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    meta = dict(run=run_id, device=device_model(device), threads=torch.get_num_threads(), torch=torch.__version__)
    sections = {"lora": lora_section, "reduce": reduce_section, "probes": probes_section, "pool": pool_section,
                "adamw": adamw_section}
    rows, failed = [], []
    for name in args.sections:
        if name == "lora" and device.type == "cuda":
            print("bench_ext: the lora section measures the CPU backend; skipped on cuda", file=sys.stderr)
            continue
        try:
            rows += sections[name](args, device, meta)
        except Exception:  # noqa: BLE001 - one broken section must not hide the others' numbers
            failed.append(name)
            print(f"bench_ext: section {name} FAILED:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
    if not rows:
        return 1 if failed else 0
    out = args.out or RESULTS / f"ext_{device.type}.csv"
    append_rows(out, FIELDS, rows)
    latest = latest_run(out, meta["device"])
    md = markdown(latest)
    atomic_write_text(out.with_suffix(".md"), md)
    print(md)
    if not args.no_plot:
        plot(latest, out.with_suffix(".png"))
    print(f"appended {len(rows)} rows to {out}")
    if failed:
        print(f"bench_ext: section(s) {', '.join(failed)} failed (see above)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
