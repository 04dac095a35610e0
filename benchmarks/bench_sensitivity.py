"""Benchmark the sensitivity estimators on a GPT-2-style transformer.

Measures, for per-layer Hessian traces of every attention and MLP weight:
  * time to reach a relative standard error target (default 10%) on every layer:
    lorambo's ``hessian_trace`` (batched probes, early stop) vs a PyHessian-style loop
    (one probe per double backward through the whole model, sequential);
  * one Hessian-vector product vs one gradient step;
  * the Fisher proxy's overhead on a training step.

Results are appended to a tidy CSV (one row per measurement, with the device, versions, threads,
load averages, and in ``timing`` how the value was taken: the minimum of the timed repeats after
one warm-up call, or one run) and drawn as a PNG from that CSV. Default size is the docs/performance.md setup (6 layers, 512 wide, batch
8x256, for a GPU); ``--small`` runs a 2-layer, 128-wide model that takes seconds on a CPU.

    python benchmarks/bench_sensitivity.py --small --threads 1 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import importlib.util
import os
import platform
import sys
import time
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

import lorambo
from lorambo.adapters.atomic import atomic_save_figure
from lorambo.sensitivity import FisherProxy, hessian_trace

sys.path.insert(0, str(Path(__file__).resolve().parent))
from arg_lists import positive  # noqa: E402
from machine import device_name  # noqa: E402
from results_csv import append_rows  # noqa: E402

SIZES = {
    "full": dict(n_layer=6, n_embd=512, n_head=8, batch=8, seq=256, vocab=2048),
    "small": dict(n_layer=2, n_embd=128, n_head=4, batch=4, seq=64, vocab=512),
    "tiny": dict(n_layer=1, n_embd=32, n_head=2, batch=2, seq=16, vocab=64),
}


def build(size: dict, device: torch.device):
    config = GPT2Config(vocab_size=size["vocab"], n_embd=size["n_embd"], n_layer=size["n_layer"],
                        n_head=size["n_head"], n_positions=size["seq"], attn_implementation="eager",
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=None, eos_token_id=None, loss_type="ForCausalLM")
    model = GPT2LMHeadModel(config).to(device).eval()
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, size["vocab"], (size["batch"], size["seq"]), generator=gen).to(device)
               for _ in range(2)]
    return model, batches


def lm_loss(model, batch):
    return model(input_ids=batch, labels=batch).loss


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeat=3):
    """The fastest of ``repeat`` timed calls of ``fn``, after one untimed warm-up call."""
    fn()
    _sync(device)
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def sequential_loop_to_target(model, batches, names, target, max_probes, seed=0):
    """PyHessian-style: per probe, one double backward through the whole model per batch;
    stop when every layer's relative standard error is below ``target``. Returns (s, probes)."""
    weights = [model.get_submodule(n).weight for n in names]
    for w in weights:
        w.requires_grad_(True)
    gen = torch.Generator(device=weights[0].device).manual_seed(seed)
    samples: list[list[float]] = []
    start = time.perf_counter()
    try:
        for _ in range(max_probes):
            vs = [torch.randint(0, 2, w.shape, generator=gen, device=w.device, dtype=w.dtype) * 2 - 1 for w in weights]
            acc = torch.zeros(len(weights), dtype=torch.float64)
            for batch in batches:
                grads = torch.autograd.grad(lm_loss(model, batch), weights, create_graph=True)
                hvs = torch.autograd.grad(grads, weights, vs)
                acc += torch.stack([(h * v).sum().double().cpu() for h, v in zip(hvs, vs)])
            samples.append((acc / len(batches)).tolist())
            if len(samples) >= 2:
                data = torch.tensor(samples, dtype=torch.float64)
                rel = data.std(0) / (len(samples) ** 0.5) / data.mean(0).abs()
                if bool((rel <= target).all()):
                    break
    finally:
        for w in weights:
            w.requires_grad_(False)
    _sync(weights[0].device)
    return time.perf_counter() - start, len(samples)


def one_gradient_and_hvp(model, batches, names, device):
    weights = [model.get_submodule(n).weight for n in names]
    for w in weights:
        w.requires_grad_(True)
    try:
        vs = [torch.randn_like(w) for w in weights]

        def grad_step():
            torch.autograd.grad(lm_loss(model, batches[0]), weights)

        def hvp():
            grads = torch.autograd.grad(lm_loss(model, batches[0]), weights, create_graph=True)
            torch.autograd.grad(grads, weights, vs)

        return timed(grad_step, device), timed(hvp, device)
    finally:
        for w in weights:
            w.requires_grad_(False)


def fisher_overhead(model, batches, device):
    lorambo.configure_model(model, 8, target_modules=["c_attn", "c_proj", "c_fc"])
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        lm_loss(model, batches[0]).backward()
        opt.step()

    plain = timed(step, device, repeat=5)
    with FisherProxy(model):
        with_proxy = timed(step, device, repeat=5)
    with FisherProxy(model, sketch_dim=4):
        with_sketch = timed(step, device, repeat=5)
    lorambo.unload(model, merge=False)
    return plain, with_proxy, with_sketch


def run(size_name: str, target: float, max_probes: int, out: Path, device: torch.device) -> list[dict]:
    size = SIZES[size_name]
    load_at_start = os.getloadavg()
    torch.manual_seed(0)
    model, batches = build(size, device)
    names = [n for n, _ in model.named_modules() if n.endswith(("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"))]
    rows = []

    def add(provider, metric, value, unit, **extra):  # printed as measured: a long run shows progress
        rows.append({"provider": provider, "metric": metric, "value": value, "unit": unit, **extra})
        print(f"{provider:>16} {metric:<18} {value:10.1f} {unit} {extra or ''}", flush=True)

    best_of_3, best_of_5, once = "min of 3 after a warm-up", "min of 5 after a warm-up", "one run"
    grad_s, hvp_s = one_gradient_and_hvp(model, batches, names, device)
    add("autograd", "one_gradient", grad_s * 1e3, "ms", timing=best_of_3)
    add("autograd", "one_hvp", hvp_s * 1e3, "ms", timing=best_of_3)

    start = time.perf_counter()
    est = hessian_trace(model, lm_loss, batches, modules=names, num_probes=max_probes, probes_per_pass=8,
                        stderr_target=target, progress=False)
    _sync(device)
    ours = time.perf_counter() - start
    probes = next(iter(est.values())).num_probes
    add("lorambo", "time_to_target", ours * 1e3, "ms", probes=probes,
        max_rel_stderr=max(e.rel_stderr for e in est.values()), timing=once)
    loop_s, loop_probes = sequential_loop_to_target(model, batches, names, target, max_probes)
    add("sequential_loop", "time_to_target", loop_s * 1e3, "ms", probes=loop_probes, timing=once)

    plain, proxy, sketch = fisher_overhead(model, batches, device)
    add("train_step", "plain", plain * 1e3, "ms", timing=best_of_5)
    add("train_step", "with_fisher_proxy", proxy * 1e3, "ms", overhead_pct=100 * (proxy / plain - 1),
        timing=best_of_5)
    add("train_step", "with_fisher_sketch4", sketch * 1e3, "ms", overhead_pct=100 * (sketch / plain - 1),
        timing=best_of_5)

    meta = {"size": size_name, "layers": len(names), "target_rel_stderr": target, "device": device_name(device),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
            "load": "{:.2f} at start, {:.2f} at end (1-minute)".format(load_at_start[0], os.getloadavg()[0]),
            "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    rows = [{**meta, **row} for row in rows]
    append_rows(out / "sensitivity.csv", FIELDS, rows, extrasaction="ignore")
    if importlib.util.find_spec("matplotlib") is not None:
        plot(out / "sensitivity.csv", out / "sensitivity.png")
    else:  # the GPU machine's image has none
        print(f"no matplotlib here: wrote {out / 'sensitivity.csv'} only; draw the PNG where matplotlib is: "
              f"python benchmarks/bench_sensitivity.py --plot-only --out {out}")
    return rows


FIELDS = ["date", "device", "threads", "load", "torch", "python", "size", "layers", "target_rel_stderr", "provider",
          "metric", "value", "unit", "timing", "probes", "max_rel_stderr", "overhead_pct"]


def plot(csv_path: Path, png_path: Path) -> None:
    """Bar charts of the latest run in the CSV: time to target, and HVP / Fisher costs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(csv_path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    latest = rows[-1]["date"]
    run_rows = [r for r in rows if r["date"] == latest]
    get = {(r["provider"], r["metric"]): float(r["value"]) for r in run_rows}
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    probes = {(r["provider"], r["metric"]): r["probes"] for r in run_rows}
    labels = [f"lorambo, batched\n({probes[('lorambo', 'time_to_target')]} probes)",
              f"sequential HVP loop\n({probes[('sequential_loop', 'time_to_target')]} probes)"]
    values = [get[("lorambo", "time_to_target")], get[("sequential_loop", "time_to_target")]]
    axes[0].bar(labels, values, color=["#2b7bba", "#999999"])
    axes[0].set_ylabel("ms")
    axes[0].set_title(f"per-layer Tr(H) to {float(run_rows[0]['target_rel_stderr']):.0%} rel. stderr "
                      "(or the probe cap)", fontsize=10)
    labels = ["gradient", "HVP", "train step", "+ Fisher\n(exact)", "+ Fisher\n(sketch k=4)"]
    values = [get[("autograd", "one_gradient")], get[("autograd", "one_hvp")],
              get[("train_step", "plain")], get[("train_step", "with_fisher_proxy")],
              get[("train_step", "with_fisher_sketch4")]]
    axes[1].bar(labels, values, color=["#999999", "#2b7bba", "#999999", "#2b7bba", "#2b7bba"])
    axes[1].set_ylabel("ms")
    axes[1].set_title("cost of one pass")
    first = run_rows[0]
    where = [first["device"], f"torch {first['torch']}", f"size {first['size']}"]
    if first.get("threads"):  # rows from before these columns leave them blank
        where.append(f"{first['threads']} thread(s)")
    if first.get("load"):
        where.append(f"load {first['load']}")
    fig.suptitle(" · ".join(where), fontsize=9)
    fig.tight_layout()
    try:
        atomic_save_figure(fig, png_path, dpi=110)
    finally:
        plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=list(SIZES), default=None,
                        help="model size (default: full on CUDA, small on CPU)")
    parser.add_argument("--small", action="store_true", help="same as --size small")
    parser.add_argument("--target", type=positive(float), default=0.1, help="relative standard error to reach")
    parser.add_argument("--max-probes", type=positive(), default=256)
    parser.add_argument("--threads", type=positive(), default=None, help="torch intra-op threads (CPU)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--plot-only", action="store_true", help="draw sensitivity.png from the CSV in --out")
    args = parser.parse_args(argv)
    if args.plot_only:
        plot(args.out / "sensitivity.csv", args.out / "sensitivity.png")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    size = "small" if args.small else args.size or ("full" if device.type == "cuda" else "small")
    print(f"bench_sensitivity: size {size} on {device_name(device)}, {torch.get_num_threads()} threads", flush=True)
    run(size, args.target, args.max_probes, args.out, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
