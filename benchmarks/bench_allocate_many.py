"""Time ``lorambo.allocate`` on many layers (input checking included), every method.

    python benchmarks/bench_allocate_many.py --layers 10000

Prints one line per method (seconds, median of ``--repeats``) and returns 0. The layers get random
(d, k) in [64, 4096), random sensitivities, capacity 32 and curves of 8 ranks.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import lorambo


def problem(layers: int, seed: int = 0):
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    dims, sens, extra, budget = problem(args.layers)
    caps = dict.fromkeys(dims, 32)
    for method in lorambo.allocation.METHODS:
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            ranks = lorambo.allocate(dims, sens, budget, method=method, capacities=caps,
                                     **extra.get(method, {}))
            times.append(time.perf_counter() - start)
        spent = sum(r * sum(dims[n]) for n, r in ranks.items())
        print(f"{method:>17}: {statistics.median(times):.3f} s for {args.layers} layers "
              f"(spent {spent:,} of {budget:,})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
