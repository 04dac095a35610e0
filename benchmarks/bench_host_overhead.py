"""Host (Python) cost per call of lorambo's hot paths on the CPU, at one thread.

    OMP_NUM_THREADS=1 python benchmarks/bench_host_overhead.py            # full
    OMP_NUM_THREADS=1 python benchmarks/bench_host_overhead.py --quick    # fewer calls, 7 repeats

Shapes small enough that the arithmetic is a few microseconds, so the figures are what the
Python around it costs (on a GPU, that host time per layer per step is what makes small-batch
training host-bound). Each case is the minimum over ``--repeats`` runs of ``calls`` calls,
divided by ``calls`` (microseconds per call):

- ``lora_fwd_m1_nograd_<backend>``: ``LoRAMBoLinear`` 768->768, rank 8, forward of one token
  under ``torch.no_grad()``; ``lora_fwdbwd_m4_<backend>``: forward + backward of 4 tokens (the
  input needs its gradient); backends ``auto`` (the default) and ``torch`` (the reference);
  ``frozen_*``: an ``nn.Linear`` of the same shape, frozen, for comparison.
- ``ref_op_fwd_m4_k64`` / ``ref_op_bwd_m4_k64``: the reference backend's registered ops
  (``torch.ops.lorambo_ref.lora_linear_fwd`` / ``lora_linear_bwd``, what a compiled graph calls
  per layer: dispatch, operand checks and the products) on 4 rows of a 64->64 layer, rank 8 in
  capacity 16, the backward asked for dx and dB: small enough that the host work shows.
- ``step_<optimizer>_48``: one step over 48 layers 256x256, rank 8 in capacity 16 (96 pools);
  ``zero_grad_<optimizer>_48``: ``zero_grad()`` over the same pools, their gradients put back
  between calls (only the ``zero_grad`` call is timed).
- ``set_rank_round_trip``: ``set_rank(4, optimizer=opt)`` then ``set_rank(8, optimizer=opt)`` on
  one of those layers, with a stepped ``lorambo.optim.AdamW``.
- ``configure_model_48``: ``configure_model(model, 8, capacity=16)`` of a fresh 48-layer model
  (building it is not timed).
- ``growth_nondecision_step_48``: ``LoRAMBoOptimizer`` with online growth, a step with no
  decision: ``with opt.capture(step): pass`` then ``opt.step(step)``.

``--sections`` runs some of the three groups (layer, optim, model); ``--summary CSV`` prints
the table of a results file. Rows go to ``--out`` (default ``benchmarks/results/host_overhead.csv``) with the machine (CPU
model, usable cores, load average), torch, the commit of the lorambo imported and ``--label``.
The script runs unchanged against older trees (``PYTHONPATH=<tree>:<tree>/kernels``) to compare
commits; run them alternately, A B C A B C, so drift on a shared machine hits each alike.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_name  # noqa: E402
from results_csv import append_rows  # noqa: E402

FIELDS = ["time_utc", "label", "commit", "case", "us_per_call", "calls", "repeats", "cpu", "usable_cores",
          "loadavg_1m", "loadavg_start", "threads", "torch", "python"]


def best_of(fn, calls: int, repeats: int) -> float:
    """Microseconds per call: the fastest of ``repeats`` timed loops of ``calls`` calls."""
    fn()  # warm up (first-call caches, lazy imports)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, time.perf_counter() - t0)
    return best / calls * 1e6


def best_of_timed(fn, setup, calls: int, repeats: int) -> float:
    """As :func:`best_of`, with ``setup()`` run untimed before each call."""
    setup(); fn()
    best = float("inf")
    for _ in range(repeats):
        total = 0.0
        for _ in range(calls):
            setup()
            t0 = time.perf_counter()
            fn()
            total += time.perf_counter() - t0
        best = min(best, total)
    return best / calls * 1e6


def layer_cases(calls, repeats):
    import lorambo
    from lorambo.nn import LoRAMBoLinear

    out = {}
    torch.manual_seed(0)
    frozen = nn.Linear(768, 768).requires_grad_(False)
    x1 = torch.randn(1, 768)
    x4 = torch.randn(4, 768, requires_grad=True)

    def frozen_fwd():
        with torch.no_grad():
            frozen(x1)

    def frozen_fwdbwd():
        frozen(x4).sum().backward()

    out["frozen_fwd_m1_nograd"] = best_of(frozen_fwd, calls, repeats)
    out["frozen_fwdbwd_m4"] = best_of(frozen_fwdbwd, calls, repeats)
    for backend in ("auto", "torch"):
        lorambo.set_backend(backend)
        layer = LoRAMBoLinear(nn.Linear(768, 768), rank=8)
        with torch.no_grad():
            layer.lora_B[:, :8].normal_()  # non-zero B, as after training

        def fwd():
            with torch.no_grad():
                layer(x1)

        def fwdbwd():
            layer(x4).sum().backward()

        out[f"lora_fwd_m1_nograd_{backend}"] = best_of(fwd, calls, repeats)
        out[f"lora_fwdbwd_m4_{backend}"] = best_of(fwdbwd, calls, repeats)
    lorambo.set_backend(None)
    out.update(registered_op_cases(calls, repeats))
    return out


def registered_op_cases(calls, repeats):
    import lorambo.ops.lora_linear_ref  # noqa: F401  registers torch.ops.lorambo_ref

    ops = torch.ops.lorambo_ref
    gen = torch.Generator().manual_seed(0)
    x, grad_y = torch.randn(4, 64, generator=gen), torch.randn(4, 64, generator=gen)
    weight, bias = torch.randn(64, 64, generator=gen), torch.randn(64, generator=gen)
    lora_A, lora_B = torch.randn(16, 64, generator=gen), torch.randn(64, 16, generator=gen)
    seed = torch.tensor(0)
    _, t = ops.lora_linear_fwd(x, weight, bias, lora_A, lora_B, 8, 2.0, 0.0, seed)

    def fwd():
        ops.lora_linear_fwd(x, weight, bias, lora_A, lora_B, 8, 2.0, 0.0, seed)

    def bwd():
        ops.lora_linear_bwd(grad_y, x, weight, lora_A, lora_B, t, 8, 2.0, 0.0, seed, True, False, False, False, True)

    return {"ref_op_fwd_m4_k64": best_of(fwd, calls, repeats), "ref_op_bwd_m4_k64": best_of(bwd, calls, repeats)}


def pool_model(n=48, width=256):
    from lorambo.nn import LoRAMBoLinear

    torch.manual_seed(0)
    layers = nn.ModuleList(LoRAMBoLinear(nn.Linear(width, width), rank=8, capacity=16) for _ in range(n))
    params = [p for p in layers.parameters() if p.requires_grad]
    grads = [torch.randn_like(p) for p in params]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    return layers, params, grads


def optimizer_cases(calls, repeats):
    import lorambo.optim
    from lorambo.nn import LoRAMBoLinear

    out = {}
    makers = {
        "lorambo_adamw": lambda ps: lorambo.optim.AdamW(ps, lr=1e-3),
        "torch_adamw_foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True),
        "torch_sgd_momentum": lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9),
    }
    for name, make in makers.items():
        layers, params, grads = pool_model()
        # the ops never give inactive slots a gradient: keep those zero so every path is exercised
        for layer in layers:
            layer.lora_A.grad[8:].zero_(); layer.lora_B.grad[:, 8:].zero_()
        opt = make(params)
        out[f"step_{name}_48"] = best_of(opt.step, calls, repeats)

        def put_back():
            for p, g in zip(params, grads):
                p.grad = g

        out[f"zero_grad_{name}_48"] = best_of_timed(opt.zero_grad, put_back, calls, repeats)
        if name == "lorambo_adamw":
            put_back()
            opt.step()
            layer = layers[0]
            assert isinstance(layer, LoRAMBoLinear)

            def round_trip():
                layer.set_rank(4, optimizer=opt)
                layer.set_rank(8, optimizer=opt)

            out["set_rank_round_trip"] = best_of(round_trip, calls, repeats)
    return out


def plain_model(n=48, width=256):
    torch.manual_seed(0)
    return nn.Sequential(*(nn.Linear(width, width) for _ in range(n)))


def model_cases(calls, repeats):
    import lorambo

    out = {}
    models = []

    def setup():
        models.append(plain_model())

    def configure():
        lorambo.configure_model(models.pop(), 8, capacity=16)

    out["configure_model_48"] = best_of_timed(configure, setup, max(1, calls // 20), repeats)

    model = plain_model()
    opt = lorambo.LoRAMBoOptimizer(model, total_budget=48 * 16 * 512, sensitivity_method="gradient",
                                   capacity=16, warmup_steps=10**9, interval=10)
    opt.configure({name: 8 for name, m in model.named_modules() if isinstance(m, nn.Linear)})
    torch_opt = opt.make_optimizer(lr=1e-3)
    assert torch_opt is not None
    step = [0]

    def nondecision():
        step[0] += 1
        with opt.capture(step[0]):
            pass
        opt.step(step[0])

    out["growth_nondecision_step_48"] = best_of(nondecision, calls, repeats)
    return out


SECTIONS = {"layer": layer_cases, "optim": optimizer_cases, "model": model_cases}


def summary(path: Path) -> str:
    """A markdown table of ``path``: per case, per label (in order of appearance), the fastest row
    (the figure least disturbed on a shared machine) and the slowest; then the load range."""
    import csv
    from collections import defaultdict

    rows = list(csv.DictReader(path.open(newline="")))
    labels = list(dict.fromkeys(r["label"] or r["commit"] for r in rows))
    cases = list(dict.fromkeys(r["case"] for r in rows))
    values, loads = defaultdict(list), defaultdict(list)
    for r in rows:
        label = r["label"] or r["commit"]
        values[(r["case"], label)].append(float(r["us_per_call"]))
        loads[label].append(float(r["loadavg_1m"]))
    out = ["| case (us per call: fastest / slowest row) | " + " | ".join(labels) + " |",
           "|---|" + "---|" * len(labels)]
    for case in cases:
        cells = []
        for label in labels:
            xs = values.get((case, label))
            cells.append("" if not xs else f"{min(xs):.1f} / {max(xs):.1f}" if max(xs) < 100
                         else f"{min(xs):.0f} / {max(xs):.0f}")
        out.append(f"| {case} | " + " | ".join(cells) + " |")
    out.append("| load average (1 min) | " + " | ".join(f"{min(loads[l]):.2f}-{max(loads[l]):.2f}" for l in labels) + " |")
    return "\n".join(out)


def commit_of(tree: Path) -> str:
    try:
        sha = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(tree), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer calls per repeat (7 repeats)")
    p.add_argument("--repeats", type=int, default=None, help="timed loops per case (default 7 quick, 11 full)")
    p.add_argument("--label", default="", help="a name for the tree measured (kept in the CSV)")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "host_overhead.csv")
    p.add_argument("--no-save", action="store_true")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                   help="layer: forward/backward; optim: steps, zero_grad, set_rank; model: configure_model, growth")
    p.add_argument("--summary", type=Path, metavar="CSV",
                   help="print a markdown table of a results CSV (per case and label: the fastest and slowest "
                        "row, and the load) and exit")
    args = p.parse_args(argv)
    if args.summary:
        print(summary(args.summary))
        return
    torch.set_num_threads(1)
    repeats = args.repeats or (7 if args.quick else 11)
    if repeats < 7:
        p.error("--repeats must be at least 7")
    layer_calls, step_calls = (200, 20) if args.quick else (1000, 60)

    import lorambo

    tree = Path(lorambo.__file__).resolve().parent.parent
    load_start = os.getloadavg()[0]
    results = {}
    for section in args.sections:
        results.update(SECTIONS[section](layer_calls if section == "layer" else step_calls, repeats))
    load = os.getloadavg()[0]
    commit = commit_of(tree)
    common = dict(time_utc=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), label=args.label,
                  commit=commit, repeats=repeats, cpu=cpu_name(), usable_cores=len(os.sched_getaffinity(0)),
                  loadavg_1m=f"{load:.2f}", loadavg_start=f"{load_start:.2f}", threads=torch.get_num_threads(),
                  torch=torch.__version__, python=platform.python_version())
    rows = []
    print(f"# {commit} ({tree}), {common['cpu']}, {common['usable_cores']} usable cores, "
          f"load {load_start:.2f} -> {load:.2f}, torch {torch.__version__}")
    for case, us in results.items():
        calls = layer_calls if case.startswith(("lora_", "frozen_", "ref_op_")) else step_calls
        if case == "configure_model_48":
            calls = max(1, step_calls // 20)
        print(f"{case:34s} {us:10.1f} us")
        rows.append(dict(common, case=case, us_per_call=f"{us:.2f}", calls=calls))
    if not args.no_save:
        append_rows(args.out, FIELDS, rows)


if __name__ == "__main__":
    main()
