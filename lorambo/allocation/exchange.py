"""Exchange moves that lower the square-root law's proxy loss ``sum_i s_i / r_i`` at integer ranks.

Rounding the continuous law (largest remainder, greedy fill) can leave the integer ranks well off
the integer optimum when a few layers share a small budget: the fill stops once no single rank
fits, although giving up one rank somewhere would pay for a better one elsewhere. This local
search repeats the best of three moves while one lowers the loss:

- swap:    one rank from layer j to layer i            (c_i <= left + c_j)
- split:   one rank from layer j, one each to i and i'  (c_i + c_i' <= left + c_j; i = i' allowed)
- merge:   one rank each from j and j', one to layer i  (c_i <= left + c_j + c_j'; j = j' allowed)

and tops up with the greedy fill after each. Moves keep every rank within ``[lower, upper]`` and
never take a layer past ``take_upper`` (the closed form passes the floor and the ceiling of the
continuous law: the moves choose which layers round up, the fill alone may go further), stay
within the budget, and only layers with s_i > 0 receive ranks. The loss of a layer at rank 0 is
taken as ``2 s_i`` (its first rank is worth s_i, the next s_i / 2, ...): 1/r has no finite value
there, and an infinite one would trade any number of ranks of a sensitive layer for one rank of
a nearly insensitive one. Each
move is O(n^2) numpy work over pairs of layers (sorted by cost once), so the moves run on
problems of up to :data:`MAX_LAYERS` layers; larger ones keep the fill.
"""
from __future__ import annotations

import numpy as np

from .greedy import greedy_allocate

_REL_TOL = 1e-12  # a move must lower the loss by more than this fraction: float noise never loops
# Above this many layers only the fill runs: a move is O(n^2) work and memory and the number of
# moves grows with n (measured: 300 layers ~0.1-0.4 s, 1,200 layers ~10 s; 10,000 would not fit in
# memory), while the rounding slack, under one rank per layer, matters less the more layers share it.
MAX_LAYERS = 256


def loss_drop(sens: np.ndarray, ranks: np.ndarray) -> np.ndarray:
    """``s / r - s / (r + 1)``: how much one more rank lowers each layer's loss (``s`` at r = 0)."""
    r = ranks.astype(np.float64)
    return sens / np.maximum(r * (r + 1.0), 1.0)


def fill(costs: np.ndarray, ranks: np.ndarray, upper: np.ndarray, budget: int, sens: np.ndarray) -> np.ndarray:
    """Greedy fill by the exact loss drop per parameter, ``(s/r - s/(r+1)) / c``."""
    s = [float(v) for v in sens]

    def gain(i: int, r: int) -> float:  # loss_drop for one layer, without numpy overhead
        return s[i] / max(r * (r + 1.0), 1.0)

    return greedy_allocate(costs, ranks, upper, budget, gain)


def _no_nan(x: np.ndarray) -> np.ndarray:
    return np.where(np.isnan(x), -np.inf, x)


class _Pairs:
    """Every unordered pair of layers {i, i'} (i = i' included), sorted once by summed cost."""

    def __init__(self, costs: np.ndarray):
        n = len(costs)
        iu, ju = np.triu_indices(n, 1)
        self.first = np.concatenate([iu, np.arange(n)])
        self.second = np.concatenate([ju, np.arange(n)])
        self.cost = costs[self.first] + costs[self.second]
        self.by_cost = np.argsort(self.cost, kind="stable")
        self.sorted_cost = self.cost[self.by_cost]

    def best_within(self, values: np.ndarray, budgets: np.ndarray) -> np.ndarray:
        """For each budget, the largest pair value whose cost fits (-inf when none)."""
        best = np.maximum.accumulate(values[self.by_cost])
        k = np.searchsorted(self.sorted_cost, budgets, side="right")
        return np.where(k > 0, best[np.maximum(k - 1, 0)], -np.inf)

    def least_from(self, values: np.ndarray, needs: np.ndarray) -> np.ndarray:
        """For each need, the smallest pair value whose cost is at least the need (inf when none)."""
        least = np.minimum.accumulate(values[self.by_cost][::-1])[::-1]
        k = np.searchsorted(self.sorted_cost, needs, side="left")
        return np.where(k < len(least), least[np.minimum(k, len(least) - 1)], np.inf)


def _move(pairs, c, sens, ranks, lower, upper, left):
    """The best (net loss drop, giver ranks, taker ranks) over swaps, splits and merges."""
    takes = sens > 0
    add1 = np.where(takes & (ranks + 1 <= upper), loss_drop(sens, ranks), -np.inf)
    add2 = np.where(takes & (ranks + 2 <= upper), add1 + loss_drop(sens, ranks + 1), -np.inf)
    rem1 = np.where(ranks - 1 >= lower, loss_drop(sens, ranks - 1), np.inf)
    rem2 = np.where(ranks - 2 >= lower, rem1 + loss_drop(sens, ranks - 2), np.inf)
    first, second, pair_cost = pairs.first, pairs.second, pairs.cost
    best = (0.0, (), ())
    with np.errstate(invalid="ignore"):  # -inf / inf mark impossible moves; never let a NaN win
        # swap: a [giver j, taker i] table
        net = add1[None, :] - rem1[:, None]
        net[c[None, :] > left + c[:, None]] = -np.inf
        np.fill_diagonal(net, -np.inf)
        net = _no_nan(net)
        j, i = np.unravel_index(int(np.argmax(net)), net.shape)
        if net[j, i] > best[0]:
            best = (float(net[j, i]), (j,), (i,))
        # split: the best pair of takers that fits each giver's freed budget. A pair holding the
        # giver itself never fits with a positive value once the fill has finished (its other
        # member would have fit the leftover alone), so the per-giver bound is exact when positive.
        pair_add = np.where(first == second, add2[first], add1[first] + add1[second])
        per_giver = pairs.best_within(pair_add, left + c) - rem1
        per_giver = _no_nan(per_giver)
        j = int(np.argmax(per_giver))
        if per_giver[j] > best[0]:
            fits = (pair_cost <= left + c[j]) & (first != j) & (second != j)
            k = int(np.argmax(np.where(fits, pair_add, -np.inf)))
            gain = float(pair_add[k] - rem1[j])
            if gain > best[0]:
                best = (gain, (j,), (first[k], second[k]))
        # merge: the cheapest pair of givers (in loss) that frees enough for each taker. When that
        # pair holds the taker itself, no pair gives the taker a positive move (convexity).
        pair_rem = np.where(first == second, rem2[first], rem1[first] + rem1[second])
        per_taker = add1 - pairs.least_from(pair_rem, c - left)
        per_taker = _no_nan(per_taker)
        i = int(np.argmax(per_taker))
        if per_taker[i] > best[0]:
            fits = (pair_cost >= c[i] - left) & (first != i) & (second != i)
            k = int(np.argmin(np.where(fits, pair_rem, np.inf)))
            gain = float(add1[i] - pair_rem[k])
            if gain > best[0]:
                best = (gain, (first[k], second[k]), (i,))
    return best


def improve(costs: np.ndarray, ranks: np.ndarray, sens: np.ndarray, lower: np.ndarray, upper: np.ndarray,
            budget: int, take_upper: np.ndarray | None = None) -> np.ndarray:
    """Fill, then apply the best exchange move and refill until no move lowers ``sum s_i / r_i``
    (the fill alone above :data:`MAX_LAYERS` layers).

    ``sens`` should be scaled to a maximum of 1: sums of a few loss drops must not overflow.
    ``take_upper``: a move never takes a layer past it (the fill still may, up to ``upper``)."""
    c = costs.astype(np.int64)
    # budget past every layer at its bound buys nothing, and a huge one would overflow int64
    budget = min(int(budget), int(np.dot(c, upper)))
    ranks = fill(costs, ranks, upper, budget, sens)
    if len(c) > MAX_LAYERS:
        return ranks
    pairs = _Pairs(c)
    move_upper = upper if take_upper is None else np.minimum(upper, take_upper)
    scale = float(np.sum(sens))
    for _ in range(10 * len(costs) + 100):  # each move strictly lowers the loss; a safety bound
        left = int(budget) - int(np.dot(c, ranks))
        gain, givers, takers = _move(pairs, c, sens, ranks, lower, move_upper, left)
        if not gain > _REL_TOL * scale:
            break
        ranks = ranks.copy()
        for j in givers:
            ranks[j] -= 1
        for i in takers:
            ranks[i] += 1
        ranks = fill(costs, ranks, upper, budget, sens)
    return ranks
