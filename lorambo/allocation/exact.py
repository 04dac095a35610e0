"""Exact optimum of the gain-based allocation by dynamic programming (small instances; test oracle).

Same integer program as ``greedy.py``. Each layer is a group whose options are "x extra ranks"
(x = 0 .. upper_i - min_rank) of weight ``x * c_i`` and value ``g_i(min_rank) + ... +
g_i(min_rank + x - 1)``; a multiple-choice knapsack DP over the leftover budget solves it exactly,
for any gains (no concavity needed). All weights are multiples of ``gcd(c_i)``, so the budget axis
is measured in units of that gcd: ``states = floor(leftover / gcd) + 1``, the leftover capped at
what every layer at its upper bound would cost. Cost is
O(sum_i (upper_i - min_rank) * states) time and O(n_layers * states) memory, hence the limits.
"""
from __future__ import annotations

import math

import numpy as np

from .greedy import Gain

MAX_STATES = 2_000_000  # budget axis length; ~16 MB per float64 row, seconds of numpy work
MAX_TABLE = 50_000_000  # n_layers * states backtracking entries (int32: 200 MB)


def exact_allocate(costs: np.ndarray, lower: np.ndarray, upper: np.ndarray, budget: int,
                   gain: Gain) -> np.ndarray:
    """Ranks maximising the summed gains within the budget (ties: fewer ranks in later layers)."""
    c = [int(x) for x in costs]
    left = int(budget) - sum(ci * int(lo) for ci, lo in zip(c, lower))
    # budget past the cost of every layer at its upper bound buys nothing: without this cap a
    # huge budget on a tiny problem would need a huge DP axis (and be refused as too large)
    left = min(left, sum(ci * (int(up) - int(lo)) for ci, lo, up in zip(c, lower, upper)))
    unit = math.gcd(*c)
    states = left // unit + 1
    if states > MAX_STATES or states * len(c) > MAX_TABLE:
        raise ValueError(f"exact=True: budget={budget} needs {states} DP states of gcd(d + k) = "
                         f"{unit} parameters ({len(c)} layers); the limit is {MAX_STATES} states "
                         f"and {MAX_TABLE} table entries. Use exact=False (greedy).")
    dp = np.zeros(states)  # dp[b]: best value using at most b units
    choices = []
    for i, ci in enumerate(c):
        w = ci // unit
        n = min(int(upper[i]) - int(lower[i]), (states - 1) // w)
        value = np.cumsum([0.0] + [float(gain(i, int(lower[i]) + j)) for j in range(n)])
        new = dp.copy()
        choice = np.zeros(states, dtype=np.int32)
        for x in range(1, n + 1):
            cand = np.full(states, -np.inf)
            cand[x * w:] = dp[:states - x * w] + value[x]
            better = cand > new
            new[better] = cand[better]
            choice[better] = x
        dp = new
        choices.append(choice)
    ranks = np.asarray(lower, dtype=np.int64).copy()
    b = states - 1
    for i in range(len(c) - 1, -1, -1):
        x = int(choices[i][b])
        ranks[i] += x
        b -= x * (c[i] // unit)
    return ranks
