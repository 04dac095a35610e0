"""LoRAMBo's closed-form square-root law, with rank bounds and integer rounding.

Continuous problem. With a proxy loss ``sum_i s_i / r_i`` (error falling like 1/r, weighted by
the sensitivity) and the budget ``sum_i r_i c_i = P`` (c_i = d_i + k_i), the Lagrange condition
``s_i / r_i^2 = lambda c_i`` gives the square-root law

    r_i* = t * w_i,   w_i = sqrt(s_i / c_i),   t = P / sum_j sqrt(s_j c_j).

Bounds. With ``min_rank <= r_i <= upper_i`` the KKT solution is ``r_i = clip(t w_i, lo_i, up_i)``
with one common water level t chosen so the clipped ranks spend exactly P. That is the fixed point
of "clip the violators, re-normalise the others, repeat", found here directly: the spend is
non-decreasing in t, so t is bisected to machine precision (no iteration-order pitfalls). If even
every layer at its upper bound fits, each layer with s_i > 0 takes its bound.

Integers. (1) floor every rank; (2) largest remainder: visit layers by decreasing fractional
part and add one rank where its cost still fits; (3) greedy fill of what is left: add ranks one
at a time to the layer with the largest loss drop per parameter ``(s_i/r_i - s_i/(r_i + 1)) / c_i``
whose cost fits (``s_i / c_i`` from rank 0: the stand-in that keeps the loss finite there);
(4) exchange moves (``exchange.py``): while trading one or two ranks of some layers for one or
two ranks of others lowers the loss, take the best such trade and fill again (problems of up
to ``exchange.MAX_LAYERS`` = 1,024 layers with up to ``exchange.MAX_COSTS`` = 256 distinct
costs d_i + k_i: a move costs O(n log n + K^2) for K distinct costs). The moves keep every
layer between the floor and the ceiling of its continuous rank: they choose which layers round
up better than the fractional parts do, without leaving the law (with equal costs every rank
stays within one of it). The fill ends when no layer with s_i > 0 below its bound fits, so the
unspent budget is smaller than the cost of every such layer.

Held to the law this way, the proxy loss is not monotone in the budget: dims (6, 5), (5, 3),
(6, 1) with sensitivities 7.22, 3.11, 4.86 give ranks (2, 0, 1) and loss 14.69 at budget 29, but
(1, 1, 1) and 15.19 at budget 30, 4 unspent. Letting the moves leave the floors, with an exact
dynamic program on small problems, removed that and lowered the proxy loss, but the ranks left
the law where it matters most, below one rank per layer: on the planted MiniLM demo (budget
20,736) Hessian sensitivities then put every rank in layers 3-5, away from three of the four
planted layers, and closed -0.06 of the uniform-to-oracle gap instead of 0.52 (3 seeds each).
The proxy ``1/r`` is a model of the loss, not the loss; the floors keep the continuous law's answer.

Measured on 1,500 seeded problems of 1-4 layers against the integer optimum over ranks no lower
than those floors (tests/allocation/test_closed_form_rounding.py): steps (1)-(3) alone missed it
on 4.3% of them, by 0.43% on average and up to 55%; with (4) on 0.5%, by 0.02% on average and
up to 8% (the ceilings are what is left of the gap). On 224 layers of 7B shapes the whole call
took 2.3 ms at 1 thread (benchmarks/results/allocate.csv, docs/performance.md); past the bounds above,
steps (1)-(3) alone keep it fast.

Sensitivities far apart. Scaled to the largest, a sensitivity under ~1e-300 of it would
underflow to 0 in the law's loss drops, and its layer would get no rank although budget is left
that the others cannot take (their bounds reached). Layers are therefore allocated in tiers,
largest sensitivities first, each in the budget the tiers above leave, with their ranks fixed. A
new tier starts below a gap of :data:`_TIER_GAP` between two sensitivities, which loses nothing:
a layer's first rank is then worth less per parameter than any rank of the tier above (ranks
and costs < 1e12); and below :data:`_TIER_SPAN` of its tier's largest, so no tier underflows.

Zero sensitivities: such a layer gets min_rank (the law gives it 0) and no fill. All sensitivities
zero makes the law 0/0: that raises ``ValueError`` rather than silently allocating something.
"""
from __future__ import annotations

import numpy as np

from .exchange import improve

_TIER_GAP = 1e-100  # a sensitivity this far below the next larger one is allocated after it (see above)
_TIER_SPAN = 1e-250  # nor does one tier reach further below its largest sensitivity


def continuous_ranks(costs: np.ndarray, sens: np.ndarray, lower: np.ndarray, upper: np.ndarray,
                     budget: int) -> np.ndarray:
    """Real-valued ranks ``clip(t sqrt(s_i / c_i), lo_i, up_i)`` spending ``budget`` (or less if all
    positive-sensitivity layers reach their bound). Requires ``sum c_i lo_i <= budget``."""
    c = costs.astype(np.float64)
    w = np.sqrt(sens / c)
    lo, up = lower.astype(np.float64), upper.astype(np.float64)
    active = w > 0

    every = bool(np.all(active))

    def ranks_at(t: float) -> np.ndarray:  # clip(t w, lo, up) as two ufuncs: np.clip's overhead is per call
        r = np.minimum(np.maximum(t * w, lo), up)
        return r if every else np.where(active, r, lo)

    # every active layer at its bound, exactly: t w_i at t = up_i / w_i can round to below up_i
    at_bounds = np.where(active, up, lo)
    if float(np.sum(c * at_bounds)) <= budget:
        return at_bounds
    t_hi = float(np.max(up[active] / w[active]))  # spend(t_hi) is the bounds' cost, > budget
    t_lo = 0.0  # spend(0) = sum c_i lo_i <= budget
    while True:  # invariant: spend(t_lo) <= budget < spend(t_hi)
        mid = 0.5 * (t_lo + t_hi)
        if mid <= t_lo or mid >= t_hi:
            break
        if float(np.sum(c * ranks_at(mid))) <= budget:
            t_lo = mid
        else:
            t_hi = mid
    return ranks_at(t_lo)


def round_ranks(x: np.ndarray, costs: np.ndarray, sens: np.ndarray, lower: np.ndarray,
                upper: np.ndarray, budget: int) -> np.ndarray:
    """Integer ranks from the continuous ones: floor, largest remainder, greedy fill, exchanges."""
    at_bound = (x == lower) | (x == upper)
    # Interior ranks are floored with a hair of slack, so float error in x can never push the
    # floors over budget; a rank lost this way has fractional part ~1 and comes back in step (2).
    eps = 1e-9 * np.maximum(1.0, x)
    ranks = np.where(at_bound, x, np.maximum(lower, np.floor(x - eps))).astype(np.int64)
    floors = ranks.copy()  # the law's guarantee: no layer ends below its floor
    left = int(budget) - int(np.sum(costs * ranks))
    frac = x - ranks
    w = np.sqrt(sens / costs)
    # by fractional part, then by w, then dims order; only layers that may take a rank, as lists
    order = np.lexsort((-w, -frac))
    order = order[((frac > 0) & (ranks < upper) & (sens > 0))[order]].tolist()
    c = costs.tolist()
    for i in order:
        if c[i] <= left:
            ranks[i] += 1
            left -= c[i]
    ceilings = np.where(at_bound, x, floors + 1).astype(np.int64)
    return improve(costs, ranks, sens, floors, upper, budget, take_upper=ceilings)


def closed_form_ranks(names: tuple, costs: np.ndarray, sens: np.ndarray, lower: np.ndarray,
                      upper: np.ndarray, budget: int) -> np.ndarray:
    if not np.any(sens > 0):
        raise ValueError(f"closed_form: all sensitivities are zero (layers {list(names)!r}), so the "
                         "square-root law r_i ~ sqrt(s_i / (d_i + k_i)) is 0/0; give at least one "
                         "positive sensitivity or use method='uniform'")
    ranks = lower.copy()
    for tier in _tiers(sens):  # the largest sensitivities first
        # the law is scale-free; 1e308-sized scores would overflow its sums
        scaled = np.zeros(len(sens))
        scaled[tier] = sens[tier] / np.max(sens[tier])
        x = continuous_ranks(costs, scaled, lower, upper, budget)
        ranks = round_ranks(x, costs, scaled, lower, upper, budget)
        lower = np.where(tier, ranks, lower)  # this tier's ranks are final: the next one fills around them
        upper = np.where(tier, ranks, upper)
    return ranks


def _tiers(sens: np.ndarray) -> list[np.ndarray]:
    """Masks of the positive sensitivities, largest first, split where one is under
    ``_TIER_GAP`` times the next larger one, or under ``_TIER_SPAN`` times its tier's largest."""
    order = np.argsort(-sens, kind="stable")
    order = order[sens[order] > 0]
    tiers, start = [], 0
    for k in range(1, len(order) + 1):
        if k == len(order) or (sens[order[k]] < _TIER_GAP * sens[order[k - 1]]
                               or sens[order[k]] < _TIER_SPAN * sens[order[start]]):
            mask = np.zeros(len(sens), dtype=bool)
            mask[order[start:k]] = True
            tiers.append(mask)
            start = k
    return tiers
