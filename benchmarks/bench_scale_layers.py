"""How lorambo's whole-model calls grow with the number of LoRA layers, on the CPU at one thread.

    OMP_NUM_THREADS=1 python benchmarks/bench_scale_layers.py                  # 96, 300, 600 layers
    OMP_NUM_THREADS=1 python benchmarks/bench_scale_layers.py --layers 96 1200 --sections model

Layers are tiny (16 wide, an MLP twice that) so that what grows with their number, the Python
around each layer and any loop over pairs of layers, is what is timed; a call that is linear in
the layer count takes ~2x the time at 2x the layers. A model of n layers is n / 6 blocks of
q, k, v, o (16 -> 16), up (16 -> 32) and down (32 -> 16). Sections and cases (ms per call, the
fastest of ``--repeats`` calls, each on a fresh model where the call changes it; building that
model is not timed):

- ``model``: ``configure_model`` (rank 4, capacity 8; default targets, and ``target_modules`` =
  every layer's full name), a re-rank of the adapted model (``configure_model(model, ranks)``),
  ``configure_model`` with a per-layer ``alpha_pattern`` (one key per layer, as ``peft_config``
  writes), ``LoRAMBoOptimizer(model, target_modules=<every name>)`` on the adapted model.
- ``adapters``: ``save_adapter``, ``load_adapter`` (into a fresh model), ``export_peft`` and
  ``import_peft`` (into a fresh model) of an adapter with ranks 1-4, so the peft config holds
  one ``rank_pattern`` / ``alpha_pattern`` key per layer.
- ``train``: ``lorambo.optim.AdamW.step()`` over the pools; a forward + backward + step with an
  online growth decision (``LoRAMBoOptimizer`` with ``interval=1``, gradient sensitivities,
  no rank moves); ``compute_optimal_ranks`` (gradient sensitivities, closed form).
- ``allocate``: ``lorambo.allocate`` with every method on n layers of 7B shapes
  (4096/11008), capacity 64, lognormal sensitivities and curves, a budget of 80,000 parameters
  per layer (40M at 500 layers).

Rows go to ``--out`` (default ``benchmarks/results/scale_layers.csv``) with the machine, the
load, torch, the commit of the lorambo imported and ``--label``; ``--summary CSV`` prints a
markdown table of a results file (per case and layer count, the fastest row of each label). The script runs unchanged
against older trees (``PYTHONPATH=<tree>:<tree>/kernels``) to compare commits; run them
alternately, A B A B, so drift on a shared machine hits each alike.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from arg_lists import positive  # noqa: E402
from bench_host_overhead import commit_of  # noqa: E402
from machine import cpu_name  # noqa: E402
from results_csv import append_rows  # noqa: E402

FIELDS = ["time_utc", "label", "commit", "section", "case", "layers", "ms", "repeats", "cpu", "usable_cores",
          "loadavg_1m", "threads", "torch", "python", "note"]
KINDS = ("q", "k", "v", "o", "up", "down")


class Block(nn.Module):
    def __init__(self, width: int = 16):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(width, width) for _ in range(4))
        self.up, self.down = nn.Linear(width, 2 * width), nn.Linear(2 * width, width)

    def forward(self, x):
        h = self.o(self.q(x) + self.k(x) + self.v(x))
        return x + self.down(torch.relu(self.up(h)))


class Stack(nn.Module):
    """``n`` Linear layers: ``n // 6`` blocks."""

    def __init__(self, n: int):
        super().__init__()
        self.layers = nn.ModuleList(Block() for _ in range(max(1, n // 6)))

    def forward(self, x):
        for block in self.layers:
            x = block(x)
        return x


def layer_names(n: int) -> list[str]:
    return [f"layers.{i}.{kind}" for i in range(max(1, n // 6)) for kind in KINDS]


def adapted(n: int, ranks=None) -> nn.Module:
    import lorambo

    torch.manual_seed(0)
    return lorambo.configure_model(Stack(n), ranks if ranks is not None else 4, capacity=8)


def fastest_ms(fn, setup=None, repeats: int = 5) -> float:
    """The fastest of ``repeats`` calls of ``fn(setup())`` (``setup`` untimed), in ms."""
    best = float("inf")
    for _ in range(repeats):
        arg = setup() if setup is not None else None
        start = time.perf_counter()
        fn(arg)
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def model_cases(n: int, repeats: int) -> dict[str, float]:
    import lorambo

    names = layer_names(n)
    ranks = {name: 1 + i % 4 for i, name in enumerate(names)}
    alphas = {name: 2.0 + i % 3 for i, name in enumerate(names)}
    existing = adapted(n)
    return {
        "configure_model": fastest_ms(lambda m: lorambo.configure_model(m, 4, capacity=8), lambda: Stack(n), repeats),
        "configure_model_target_list": fastest_ms(
            lambda m: lorambo.configure_model(m, 4, capacity=8, target_modules=names), lambda: Stack(n), repeats),
        "configure_model_rerank": fastest_ms(lambda _: lorambo.configure_model(existing, ranks), None, repeats),
        "configure_model_alpha_pattern": fastest_ms(
            lambda m: lorambo.configure_model(m, ranks, capacity=8, alpha_pattern=alphas), lambda: Stack(n), repeats),
        "optimizer_init_target_list": fastest_ms(
            lambda _: lorambo.LoRAMBoOptimizer(existing, total_budget=n * 48 * 8, sensitivity_method="gradient",
                                               target_modules=names), None, repeats),
    }


def adapter_cases(n: int, repeats: int) -> dict[str, float]:
    import lorambo

    model = adapted(n, {name: 1 + i % 4 for i, name in enumerate(layer_names(n))})
    with tempfile.TemporaryDirectory() as folder:
        saved, exported = Path(folder, "adapter"), Path(folder, "peft")
        out = {"save_adapter": fastest_ms(lambda _: lorambo.save_adapter(model, saved), None, repeats),
               "load_adapter": fastest_ms(lambda m: lorambo.load_adapter(m, saved), lambda: Stack(n), repeats),
               "export_peft": fastest_ms(lambda _: lorambo.export_peft(model, exported), None, repeats),
               "import_peft": fastest_ms(lambda m: lorambo.import_peft(m, exported), lambda: Stack(n), repeats)}
    return out


def train_cases(n: int, repeats: int) -> dict[str, float]:
    import lorambo

    torch.manual_seed(0)
    batch = torch.randn(4, 16)

    def loss_fn(model, x):
        return model(x).pow(2).mean()

    model = adapted(n)
    adamw = lorambo.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    loss_fn(model, batch).backward()
    out = {"adamw_step": fastest_ms(lambda _: adamw.step(), None, repeats)}

    model = Stack(n)
    opt = lorambo.LoRAMBoOptimizer(model, total_budget=n * 48 * 8, sensitivity_method="gradient", capacity=16,
                                   warmup_steps=1, interval=1)
    out["compute_optimal_ranks"] = fastest_ms(
        lambda _: opt.compute_optimal_ranks([batch], loss_fn, progress=False), None, repeats)
    opt.configure({name: max(1, r // 2) for name, r in opt.ranks.items()})
    adam = opt.make_optimizer()
    step = [0]

    def decision_step(_):
        step[0] += 1
        with opt.capture(step[0], batch):
            loss_fn(model, batch).backward()
        adam.step()
        opt.step(step[0])
        adam.zero_grad()

    out["growth_decision_step"] = fastest_ms(decision_step, None, repeats)
    return out


def allocate_cases(n: int, repeats: int) -> dict[str, float]:
    import lorambo

    rng = np.random.default_rng(0)
    shapes = [(4096, 4096)] * 4 + [(11008, 4096)] * 2 + [(4096, 11008)]
    dims = {f"layers.{i // 7}.proj{i % 7}": shapes[i % 7] for i in range(n)}
    sens = {name: float(rng.lognormal(0.0, 2.0)) for name in dims}
    caps = dict.fromkeys(dims, 64)

    def curve():
        return np.sort(rng.lognormal(0.0, 1.0, 64))[::-1]

    extra = {"knapsack": {"benefits": {name: curve() for name in dims}},
             "frobenius_greedy": {"spectra": {name: curve() for name in dims}},
             "data_weighted": {"tail_energies": {name: np.concatenate([np.cumsum(curve()[::-1])[::-1], [0.0]])
                                                 for name in dims}}}
    budget = 80_000 * n
    return {f"allocate_{method}": fastest_ms(
        lambda _, m=method: lorambo.allocate(dims, sens, budget, method=m, capacities=caps, **extra.get(m, {})),
        None, repeats) for method in lorambo.allocation.METHODS}


SECTIONS = {"model": model_cases, "adapters": adapter_cases, "train": train_cases, "allocate": allocate_cases}


def summary(path: Path) -> str:
    """A markdown table of ``path``: a row per case, a column per label (in order of appearance)
    and layer count, each cell the fastest of that label's rows (the figure least disturbed on a
    shared machine); then the load range of each label."""
    import csv

    rows = list(csv.DictReader(path.open(newline="")))
    labels = list(dict.fromkeys(r["label"] or r["commit"] for r in rows))
    counts = sorted({int(r["layers"]) for r in rows})
    cases = list(dict.fromkeys((r["section"], r["case"]) for r in rows))
    best: dict[tuple, float] = {}
    loads: dict[str, list[float]] = {label: [] for label in labels}
    for r in rows:
        label = r["label"] or r["commit"]
        key = (r["section"], r["case"], label, int(r["layers"]))
        best[key] = min(best.get(key, float("inf")), float(r["ms"]))
        loads[label].append(float(r["loadavg_1m"]))
    columns = [(label, n) for label in labels for n in counts]
    out = ["| case (ms) | " + " | ".join(f"{label}, {n}" for label, n in columns) + " |",
           "|---|" + "---|" * len(columns)]
    for section, case in cases:
        cells = [best.get((section, case, label, n)) for label, n in columns]
        out.append(f"| {case} | " + " | ".join("" if v is None else f"{v:.1f}" if v < 100 else f"{v:.0f}"
                                              for v in cells) + " |")
    out.append("| load average (1 min) | " + " | ".join(
        f"{min(loads[label]):.2f}-{max(loads[label]):.2f}" for label, _ in columns) + " |")
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=positive(), nargs="+", default=[96, 300, 600],
                        help="layer counts (each rounded down to a multiple of 6)")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--repeats", type=positive(), default=5, help="calls per case (the fastest is kept)")
    parser.add_argument("--label", default="", help="a name for the tree measured (kept in the CSV)")
    parser.add_argument("--note", default="")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "scale_layers.csv")
    parser.add_argument("--no-save", action="store_true")
    parser.add_argument("--summary", type=Path, metavar="CSV", help="print a markdown table of a results CSV and exit")
    args = parser.parse_args(argv)
    if args.summary:
        print(summary(args.summary))
        return 0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")  # the tiny models' frozen-head and similar notices, once per model
    try:
        import lorambo

        tree = Path(lorambo.__file__).resolve().parent.parent
        commit = commit_of(tree)
        rows = []
        for n in args.layers:
            n = max(6, n - n % 6)
            for section in args.sections:
                for case, ms in SECTIONS[section](n, args.repeats).items():
                    print(f"{n:>6} layers {section:>8} {case:32s} {ms:10.2f} ms", flush=True)
                    rows.append(dict(section=section, case=case, layers=n, ms=f"{ms:.3f}"))
        common = dict(time_utc=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), label=args.label,
                      commit=commit, repeats=args.repeats, cpu=cpu_name(), usable_cores=len(os.sched_getaffinity(0)),
                      loadavg_1m=f"{os.getloadavg()[0]:.2f}", threads=torch.get_num_threads(),
                      torch=torch.__version__, python=platform.python_version(), note=args.note)
        if not args.no_save:
            append_rows(args.out, FIELDS, [dict(common, **row) for row in rows])
            print(f"appended {len(rows)} rows to {args.out}")
    finally:
        torch.set_num_threads(threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
