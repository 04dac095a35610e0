"""Time the allocators (input checking included) on random layers or on model-like shapes.

    python benchmarks/bench_allocate_many.py --layers 10000             # random shapes, every method
    OMP_NUM_THREADS=1 python benchmarks/bench_allocate_many.py --shapes minilm 7b

``random``: ``--layers`` layers with (d, k) in [64, 4096), random sensitivities, capacity 32 and
curves of 8 ranks, budget 5,000 parameters per layer. ``minilm`` (36 layers, 384/1536) and ``7b``
(224 layers, 4096/11008): ``--problems`` seeded sensitivity sets (lognormal, sigma 2: the spread
that makes the closed form's exchange search work hardest), capacity 64, curves of 64 ranks, a
budget of rank 8 on average. Besides ``allocate``'s methods, the model shapes time the online
growth decision's allocation (``plan_growth``, ``plan_moves``; ``plan_moves_unfunded``: the
budget spent and only the cheapest layers' components idle) and ALoRA's reallocation plan.

Every figure is milliseconds per call (one allocation of one problem). Each problem is called
``--repeats`` times; over the problems (one for ``random``, ``--problems`` per model shape) the
columns of ``--out``/allocate.csv, appended with the machine, and the printed line are:

- ``ms_median``: the median over problems of each problem's median call;
- ``ms_min``: the median over problems of each problem's fastest call (not the fastest call of
  all), the figure least disturbed by other load on a shared machine, which docs/performance.md
  quotes;
- ``ms_max``: the largest of the problems' median calls (the slowest problem, not the slowest
  call).
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
from types import SimpleNamespace

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import lorambo  # noqa: E402
from lorambo.allocation.alora import _plan as alora_plan  # noqa: E402
from lorambo.allocation.online import plan_growth, plan_moves  # noqa: E402
from arg_lists import positive  # noqa: E402
from machine import cpu_description  # noqa: E402
from results_csv import append_rows  # noqa: E402

MINILM = [(384, 384)] * 4 + [(1536, 384), (384, 1536)]  # (out, in) per block
SEVEN_B = [(4096, 4096)] * 4 + [(11008, 4096)] * 2 + [(4096, 11008)]
MODELS = {"minilm": MINILM * 6, "7b": SEVEN_B * 32}
FIELDS = ["date", "machine", "python", "numpy", "omp_threads", "load", "shape", "layers", "method",
          "ms_median", "ms_min", "ms_max", "problems", "repeats", "note"]


def problem(layers: int, seed: int = 0):
    """Random shapes: (dims, sensitivities, extra keyword arguments per method, budget)."""
    rng = np.random.default_rng(seed)
    dims = {f"model.layers.{i}.proj": (int(rng.integers(64, 4096)), int(rng.integers(64, 4096)))
            for i in range(layers)}
    sens = {name: float(rng.random()) for name in dims}
    extra = {
        "frobenius_greedy": {"spectra": {n: np.sort(rng.random(8))[::-1] for n in dims}},
        "knapsack": {"benefits": {n: np.sort(rng.random(8))[::-1] for n in dims}},
        "data_weighted": {"tail_energies": {n: np.linspace(1.0, 0.0, 9) ** 2 for n in dims}},
    }
    budget = 5_000 * layers
    return dims, sens, extra, budget


def model_problem(shape: str, seed: int, capacity: int = 64):
    """Model shapes: like :func:`problem`, plus the inputs of the online and ALoRA plans."""
    rng = np.random.default_rng(seed)
    dims = {f"layers.{i // 7}.proj{i % 7}": dk for i, dk in enumerate(MODELS[shape])}
    sens = {n: float(rng.lognormal(0.0, 2.0)) for n in dims}
    curve = lambda: np.sort(rng.lognormal(0.0, 1.0, capacity))[::-1]  # noqa: E731
    extra = {
        "frobenius_greedy": {"spectra": {n: curve() for n in dims}},
        "knapsack": {"benefits": {n: curve() for n in dims}},
        "data_weighted": {"tail_energies": {n: np.concatenate([np.cumsum(curve()[::-1])[::-1], [0.0]])
                                            for n in dims}},
    }
    budget = 8 * sum(d + k for d, k in dims.values())
    costs = {n: d + k for n, (d, k) in dims.items()}
    gains = {n: np.sort(rng.lognormal(0.0, 1.0, 4))[::-1] for n in dims}  # sketch_rank 4
    ranks = {n: int(rng.integers(1, 9)) for n in dims}
    # growth: budget left over; moves: the budget spent (what makes moves the decision) but 1,000
    online = dict(gains=gains, costs=costs, room={n: capacity - r for n, r in ranks.items()},
                  budget_left=budget - sum(costs[n] * r for n, r in ranks.items()), move_left=1_000,
                  scores={n: rng.normal(0.0, 1.0, r) for n, r in ranks.items()})
    layers = {n: SimpleNamespace(out_features=d, in_features=k, rank=ranks[n], capacity=capacity)
              for n, (d, k) in dims.items()}
    return dims, sens, extra, budget, online, layers


def _times_ms(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - start))
    return times


def model_calls(shape: str, seed: int):
    """{method: zero-argument call} for one seeded model-shaped problem."""
    import torch

    dims, sens, extra, budget, online, layers = model_problem(shape, seed)
    caps = dict.fromkeys(dims, 64)
    calls = {m: (lambda m=m: lorambo.allocate(dims, sens, budget, method=m, capacities=caps, **extra.get(m, {})))
             for m in lorambo.allocation.METHODS}
    calls["plan_growth"] = lambda: plan_growth(online["gains"], online["costs"], online["room"],
                                               online["budget_left"])
    nxt = {n: float(g[0]) for n, g in online["gains"].items()}
    calls["plan_moves"] = lambda: plan_moves(nxt, online["scores"], online["costs"], online["room"],
                                             online["move_left"], 0.0, 0.0, max_moves=8)
    # budget spent, the MLP layers want ranks, only attention components are idle: no donor pays
    # for a receiver alone (what made plan_moves scan every component for every receiver), so each
    # rank is paid by several
    costs = online["costs"]
    wants = {n: float(costs[n] > min(costs.values())) - 0.5 for n in dims}
    idle = {n: np.abs(s) * (-1.0 if costs[n] == min(costs.values()) else 1.0) for n, s in online["scores"].items()}
    calls["plan_moves_unfunded"] = lambda: plan_moves(wants, idle, costs, online["room"], 0, 0.0, 0.0, max_moves=8)
    scores = {n: torch.as_tensor(s) for n, s in online["scores"].items()}
    calls["alora_plan"] = lambda: alora_plan(layers, scores, 8, budget)
    return calls


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=positive(), default=10_000, help="layer count of the random shapes")
    parser.add_argument("--shapes", nargs="*", default=["random"], choices=["random", *MODELS])
    parser.add_argument("--problems", type=positive(), default=5, help="seeded problems per model shape")
    parser.add_argument("--repeats", type=positive(), default=3,
                        help="calls per problem (ms_median: their median, ms_min: the fastest; see above)")
    parser.add_argument("--note", default="")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="folder of allocate.csv")
    args = parser.parse_args(argv)
    rows = []
    for shape in args.shapes:
        if shape == "random":
            dims, sens, extra, budget = problem(args.layers)
            caps = dict.fromkeys(dims, 32)
            per_method = {m: [(lambda m=m: lorambo.allocate(dims, sens, budget, method=m, capacities=caps,
                                                            **extra.get(m, {})))]
                          for m in lorambo.allocation.METHODS}
            layers = args.layers
        else:
            problems = [model_calls(shape, seed) for seed in range(args.problems)]
            per_method = {m: [p[m] for p in problems] for m in problems[0]}
            layers = len(MODELS[shape])
        for method, calls in per_method.items():
            times = [_times_ms(call, args.repeats) for call in calls]
            ms = [statistics.median(t) for t in times]
            fastest = statistics.median(min(t) for t in times)  # the least disturbed by other load
            rows.append({"shape": shape, "layers": layers, "method": method,
                         "ms_median": f"{statistics.median(ms):.3f}", "ms_min": f"{fastest:.3f}", "ms_max": f"{max(ms):.3f}", "problems": len(calls),
                         "repeats": args.repeats})
            print(f"{shape:>6} {layers:>6} layers {method:>19}: {statistics.median(ms):8.3f} ms median call, "
                  f"{fastest:8.3f} ms fastest call (median over problems), {max(ms):8.3f} ms median call "
                  f"of the slowest of {len(calls)} problem(s)")
    meta = {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "machine": cpu_description(), "python": platform.python_version(),
            "numpy": np.__version__, "omp_threads": os.environ.get("OMP_NUM_THREADS", ""),
            "load": " ".join(f"{v:.2f}" for v in os.getloadavg()), "note": args.note}
    path = Path(args.out) / "allocate.csv"
    append_rows(path, FIELDS, [{**meta, **row} for row in rows])
    print(f"appended {len(rows)} rows to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
