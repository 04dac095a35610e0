"""Uniform allocation: one water level for every layer (the ALoRA starting point).

Semantics (water-level uniform): find the largest integer level L with
``sum_i clip(L, min_rank, upper_i) * c_i <= budget``. Layers whose upper bound is below L keep
their bound; every other layer gets L. That level alone can leave up to ``sum c_i`` parameters
unspent, so the leftover is handed out one extra rank per layer, cheapest layers first (ties in
dims order) while it fits: the most layers get L + 1. Result: uncapped layers differ by at most
one rank, and the leftover is smaller than the cost of some layer that is still below its bound.
Sensitivities are ignored.
"""
from __future__ import annotations

import numpy as np


def uniform_ranks(costs: np.ndarray, lower: np.ndarray, upper: np.ndarray, budget: int) -> np.ndarray:
    def spend(level: int) -> int:
        return int(np.sum(costs * np.clip(level, lower, upper)))

    lo, hi = int(lower.min()), int(upper.max())  # spend(lo) <= budget was validated
    while lo < hi:  # largest level that fits
        mid = (lo + hi + 1) // 2
        if spend(mid) <= budget:
            lo = mid
        else:
            hi = mid - 1
    ranks = np.clip(lo, lower, upper).astype(np.int64)
    left = int(budget) - spend(lo)
    for i in np.argsort(costs, kind="stable"):
        if ranks[i] == lo < upper[i] and costs[i] <= left:
            ranks[i] += 1
            left -= int(costs[i])
    return ranks
