"""One greedy engine (rank-by-rank, best gain per parameter first) and the curves that feed it.

Every gain-based method is the same integer program

    maximise  sum_i sum_{r = min_rank}^{r_i - 1} g_i(r)    s.t.  sum_i r_i c_i <= budget,
                                                                min_rank <= r_i <= upper_i,

where ``g_i(r)`` is the gain of growing layer i from rank r to r + 1 and ``c_i = d_i + k_i``. When
every ``g_i`` is non-increasing (diminishing returns), each rank of a layer is an item with value
``g_i(r)`` and weight ``c_i`` whose ratio never beats the previous rank's, so taking items in
global ratio order never takes a rank before the one below it. That is the fractional-knapsack
greedy: it is optimal when no positive-gain rank had to be skipped for not fitting (always the
case with equal costs), and in general it is within the largest single item value of the integer
optimum (greedy >= OPT - max_item, the LP rounding bound; ``exact.py`` is the oracle).
The LoRAMBo online allocator ("add one rank to the layer with the best Delta_i / (d_i + k_i),
stop when no gain is positive or the budget is spent") is this loop.

Method wrappers only differ in the curve:

- ``knapsack``:         g_i(r) = benefits_i[r]                    (given, absolute rank index)
- ``frobenius_greedy``: g_i(r) = s_i * sigma_{r+1}(W_i)^2         (error of the best rank-r
                         approximation drops by exactly sigma_{r+1}^2: Eckart-Young)
- ``data_weighted``:    g_i(r) = s_i * (E_i[r] - E_i[r+1])        (data-weighted tail energy)

Ranks beyond the end of a curve have no known gain and are never handed out.
"""
from __future__ import annotations

import heapq
from typing import Callable, Sequence

import numpy as np

Gain = Callable[[int, int], float]  # (layer index, current rank r) -> gain of r -> r + 1


def greedy_allocate(costs: np.ndarray, start: np.ndarray, upper: np.ndarray, budget: int,
                    gain: Gain) -> np.ndarray:
    """Add ranks one at a time to the layer with the largest ``gain / cost`` that still fits.

    Starts from ``start`` (whose cost must fit), never passes ``upper``, skips a layer for good once
    its next rank no longer fits (the leftover budget only shrinks) and stops when no positive gain
    remains. ``gain`` must be non-increasing in r for each layer; ties go to the earlier layer.
    """
    c = [int(x) for x in costs]
    r = [int(x) for x in start]
    up = [int(x) for x in upper]
    left = int(budget) - sum(ci * ri for ci, ri in zip(c, r))
    if left < 0:
        raise ValueError(f"the starting ranks cost {budget - left} > budget={budget}")
    heap = []

    def push(i: int) -> None:
        if r[i] < up[i] and c[i] <= left:
            g = float(gain(i, r[i]))
            if g > 0:  # diminishing returns: a non-positive gain ends this layer
                heapq.heappush(heap, (-g / c[i], i))

    for i in range(len(c)):
        push(i)
    while heap:
        _, i = heapq.heappop(heap)
        if c[i] > left:  # does not fit now, never will: drop the layer
            continue
        r[i] += 1
        left -= c[i]
        push(i)
    return np.asarray(r, dtype=np.int64)


def curve_gain(curves: Sequence[np.ndarray], scale: np.ndarray | None = None) -> Gain:
    """Gain function reading ``scale[i] * curves[i][r]`` (0 past the end of the curve)."""
    s = np.ones(len(curves)) if scale is None else scale

    def gain(i: int, r: int) -> float:
        cur = curves[i]
        return float(s[i] * cur[r]) if r < cur.size else 0.0

    return gain


def curve_upper(curves: Sequence[np.ndarray], lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    """Upper bounds tightened to the curve lengths (never below ``lower``)."""
    lengths = np.asarray([cur.size for cur in curves], dtype=np.int64)
    return np.maximum(lower, np.minimum(upper, lengths))


def frobenius_curves(spectra: list[np.ndarray]) -> list[np.ndarray]:
    """Rank r -> r + 1 removes ``sigma_{r+1}^2`` (0-based: ``spectrum[r] ** 2``) of ||W - W_r||_F^2."""
    return [sp * sp for sp in spectra]


def data_weighted_curves(tail_energies: list[np.ndarray]) -> list[np.ndarray]:
    """Rank r -> r + 1 removes ``E[r] - E[r+1]`` of the data-weighted error."""
    return [-np.diff(e) for e in tail_energies]
