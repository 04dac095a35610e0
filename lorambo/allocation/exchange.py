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
a nearly insensitive one.

Cost. The best move is the one a scan of every (giver, taker) table in index order would pick,
ties included, but found without the O(n^2) tables: a swap needs each giver's best other taker
within its budget (a running top two over the layers by cost); a split or merge needs the best
pair within (or beyond) a budget, and that depends only on the best two layers of each cost, so
it is looked up in a table over pairs of the K distinct costs. A move is O(n log n + K^2) numpy
work, and the refill only visits layers whose next rank still fits. The moves run on problems of
up to :data:`MAX_LAYERS` layers with up to :data:`MAX_COSTS` distinct costs; larger ones keep
the fill (tests/allocation/test_exchange_reference.py holds the O(n^2) reference).
"""
from __future__ import annotations

import numpy as np

from .greedy import greedy_allocate

_REL_TOL = 1e-12  # a move must lower the loss by more than this fraction: float noise never loops
# Past either bound only the fill runs. A move is O(n log n + K^2) work for K distinct costs and
# the number of moves grows with n (7B shapes, 2 costs, 1 thread: 224 layers ~1-2 ms, 896 ~15-30 ms,
# 10,080 ~0.8 s; 256 layers of random costs ~0.1-0.2 s), while the rounding slack, under one rank
# per layer, matters less the more layers share it.
MAX_LAYERS = 1024
MAX_COSTS = 256


def loss_drop(sens: np.ndarray, ranks: np.ndarray) -> np.ndarray:
    """``s / r - s / (r + 1)``: how much one more rank lowers each layer's loss (``s`` at r = 0)."""
    r = ranks.astype(np.float64)
    return sens / np.maximum(r * (r + 1.0), 1.0)


def fill(costs: np.ndarray, ranks: np.ndarray, upper: np.ndarray, budget: int, sens: np.ndarray) -> np.ndarray:
    """Greedy fill by the exact loss drop per parameter, ``(s/r - s/(r+1)) / c``.

    Only layers whose next rank fits the leftover now can ever take one (the leftover only
    shrinks), so the heap runs over those: after an exchange move that is usually none."""
    c = costs.astype(np.int64)
    ranks = ranks.astype(np.int64)
    left = int(budget) - int(np.dot(c, ranks))
    if left < 0:
        raise ValueError(f"exchange.fill: the starting ranks cost {int(budget) - left} > budget={budget}")
    open_ = (ranks < upper) & (c <= left) & (loss_drop(sens, ranks) > 0)
    if not open_.any():
        return ranks
    idx = np.flatnonzero(open_)
    s = [float(sens[i]) for i in idx]

    def gain(i: int, r: int) -> float:  # loss_drop for one layer, without numpy overhead
        return s[i] / max(r * (r + 1.0), 1.0)

    out = ranks.copy()  # ties go to the lower index in both: idx is increasing
    out[idx] = greedy_allocate(c[idx], ranks[idx], upper[idx], left + int(np.dot(c[idx], ranks[idx])), gain)
    return out


class _CostClasses:
    """Layers grouped by cost. The best pair of layers within a budget depends only on the best
    two layers of each cost (and the best one taking two ranks), so every pair search below runs
    over pairs of distinct costs: a handful in a real model (two at 7B: 4096 + 4096, 4096 + 11008)."""

    def __init__(self, costs: np.ndarray):
        n = len(costs)
        self.order = np.argsort(costs, kind="stable")  # layers by cost, then index
        self.sorted_cost = costs[self.order]
        values, self.starts, counts = np.unique(self.sorted_cost, return_index=True, return_counts=True)
        self.values = values
        self.of = np.searchsorted(values, costs)  # each layer's cost, as an index into values
        self.of_sorted = np.repeat(np.arange(len(values)), counts)
        self.index = np.arange(n)
        a, b = np.triu_indices(len(values))
        self.a, self.b, self.diag = a, b, a == b
        cost = values[a] + values[b]
        self.by_cost = np.argsort(cost, kind="stable")
        self.pair_cost = cost[self.by_cost]

    def pair_max(self, one: np.ndarray, two: np.ndarray) -> np.ndarray:
        """Per pair of costs (by summed cost): the largest ``one[i] + one[i']`` over two layers
        of those costs, or ``two[i]`` (a layer taken twice) when the costs are equal."""
        v = one[self.order]
        top1 = np.maximum.reduceat(v, self.starts)
        first = np.minimum.reduceat(np.where(v == top1[self.of_sorted], self.index, len(v)), self.starts)
        v[first] = -np.inf  # one of the best of each cost out: the best of the rest is the second
        top2 = np.maximum.reduceat(v, self.starts)
        twice = np.maximum.reduceat(two[self.order], self.starts)
        a, b = self.a, self.b
        val = np.where(self.diag, np.maximum(top1[a] + top2[a], twice[a]), top1[a] + top1[b])
        return val[self.by_cost]

    def best_within(self, values: np.ndarray, budgets: np.ndarray) -> np.ndarray:
        """For each budget, the largest of ``pair_max``'s values whose cost fits (-inf when none)."""
        best = np.maximum.accumulate(values)
        k = np.searchsorted(self.pair_cost, budgets, side="right")
        return np.where(k > 0, best[np.maximum(k - 1, 0)], -np.inf)

    def best_from(self, values: np.ndarray, needs: np.ndarray) -> np.ndarray:
        """For each need, the largest of ``pair_max``'s values costing at least that (-inf when none)."""
        best = np.maximum.accumulate(values[::-1])[::-1]
        k = np.searchsorted(self.pair_cost, needs, side="left")
        return np.where(k < len(best), best[np.minimum(k, len(best) - 1)], -np.inf)

    def best_other_within(self, values: np.ndarray, budgets: np.ndarray) -> np.ndarray:
        """For each layer j, the largest ``values[i]`` over layers i != j with cost <= the budget of
        j's cost (``budgets``: one per cost in ``self.values``, each covering that cost): a running
        top two over the layers by cost."""
        v = values[self.order]
        top = np.maximum.accumulate(v)
        second = np.maximum.accumulate(np.minimum(v, np.concatenate(([-np.inf], top[:-1]))))
        k = np.searchsorted(self.sorted_cost, budgets, side="right")[self.of] - 1
        top, second = top[k], second[k]
        return np.where((values == top) & (second < top), second, top)  # j itself the only best: the next


def _first_best_pair(classes, one, two, costs, skip, lo, hi):
    """``(value, (i, i'))``: the pair avoiding layer ``skip`` with summed cost in [lo, hi] and the
    largest value (``one[i] + one[i']``, or ``two[i]`` for i = i'), the first one in the order
    ``i < i'`` row by row, then ``(i, i)``; None when no pair has a finite value."""
    one, two = one.copy(), two.copy()
    one[skip] = two[skip] = -np.inf
    vals = classes.pair_max(one, two)
    inside = vals[(classes.pair_cost >= lo) & (classes.pair_cost <= hi)]
    value = float(np.max(inside)) if inside.size else -np.inf
    if value == -np.inf:
        return None
    # a layer of a pair worth `value` needs one[i] >= value - (its partner's one), up to rounding;
    # the partner's one is at most the best of the costs that fit with the layer's own cost
    v = classes.values
    pair_cost = v[:, None] + v[None, :]
    top = np.maximum.reduceat(one[classes.order], classes.starts)
    partner = np.max(np.where((pair_cost >= lo) & (pair_cost <= hi), top[None, :], -np.inf), axis=1)
    finite = partner > -np.inf
    p = np.where(finite, partner, 0.0)
    floor = np.where(finite, value - p - 1e-12 * (abs(value) + np.abs(p)), np.inf)
    cand = np.flatnonzero(one >= floor[classes.of])
    x, cc = one[cand], costs[cand]
    cost = cc[:, None] + cc[None, :]
    hits = np.triu((x[:, None] + x[None, :] == value) & (cost >= lo) & (cost <= hi), 1)
    if hits.any():
        p, q = divmod(int(np.argmax(hits)), len(cand))
        return value, (int(cand[p]), int(cand[q]))
    i = int(np.argmax((two == value) & (2 * costs >= lo) & (2 * costs <= hi)))
    return value, (i, i)


def _move(classes, c, sens, ranks, lower, upper, left):
    """The best (net loss drop, giver ranks, taker ranks) over swaps, splits and merges.

    Ties go as in a scan of every (giver, taker) table in index order: the first giver, then the
    first taker (swaps: row by row; pairs: ``i < i'`` row by row, then ``(i, i)``), and between
    move kinds to the swap, then the split. O(n log n + K^2) for K distinct costs."""
    takes = sens > 0
    add1 = np.where(takes & (ranks + 1 <= upper), loss_drop(sens, ranks), -np.inf)
    add2 = np.where(takes & (ranks + 2 <= upper), add1 + loss_drop(sens, ranks + 1), -np.inf)
    rem1 = np.where(ranks - 1 >= lower, loss_drop(sens, ranks - 1), np.inf)
    rem2 = np.where(ranks - 2 >= lower, rem1 + loss_drop(sens, ranks - 2), np.inf)
    best = (0.0, (), ())
    # swap: giver j's best taker i != j with c_i <= left + c_j
    net = classes.best_other_within(add1, left + classes.values) - rem1
    j = int(np.argmax(net))
    if net[j] > best[0]:
        row = add1 - rem1[j]
        row[c > left + c[j]] = -np.inf
        row[j] = -np.inf
        i = int(np.argmax(row))
        best = (float(row[i]), (j,), (i,))
    # split: the best pair of takers that fits each giver's freed budget. A pair holding the
    # giver itself never fits with a positive value once the fill has finished (its other
    # member would have fit the leftover alone), so the per-giver bound is exact when positive,
    # and a pair without the giver is found.
    per_giver = classes.best_within(classes.pair_max(add1, add2), left + classes.values)[classes.of] - rem1
    j = int(np.argmax(per_giver))
    if per_giver[j] > best[0]:
        value, takers = _first_best_pair(classes, add1, add2, c, j, -np.inf, left + c[j])
        gain = float(value - rem1[j])
        if gain > best[0]:
            best = (gain, (j,), takers)
    # merge: the cheapest pair of givers (in loss) that frees enough for each taker. When that
    # pair holds the taker itself, no pair gives the taker a positive move (convexity), so a
    # pair without the taker is found.
    per_taker = add1 + classes.best_from(classes.pair_max(-rem1, -rem2), classes.values - left)[classes.of]
    i = int(np.argmax(per_taker))
    if per_taker[i] > best[0]:
        value, givers = _first_best_pair(classes, -rem1, -rem2, c, i, c[i] - left, np.inf)
        gain = float(add1[i] + value)
        if gain > best[0]:
            best = (gain, givers, (i,))
    return best


def improve(costs: np.ndarray, ranks: np.ndarray, sens: np.ndarray, lower: np.ndarray, upper: np.ndarray,
            budget: int, take_upper: np.ndarray | None = None) -> np.ndarray:
    """Fill, then apply the best exchange move and refill until no move lowers ``sum s_i / r_i``
    (the fill alone past :data:`MAX_LAYERS` layers or :data:`MAX_COSTS` distinct costs).

    ``sens`` should be scaled to a maximum of 1: sums of a few loss drops must not overflow.
    ``take_upper``: a move never takes a layer past it (the fill still may, up to ``upper``)."""
    c = costs.astype(np.int64)
    # budget past every layer at its bound buys nothing, and a huge one would overflow int64
    budget = min(int(budget), int(np.dot(c, upper)))
    ranks = fill(costs, ranks, upper, budget, sens)
    if len(c) > MAX_LAYERS or len(np.unique(c)) > MAX_COSTS:
        return ranks
    classes = _CostClasses(c)
    move_upper = upper if take_upper is None else np.minimum(upper, take_upper)
    scale = float(np.sum(sens))
    for _ in range(10 * len(costs) + 100):  # each move strictly lowers the loss; a safety bound
        left = int(budget) - int(np.dot(c, ranks))
        gain, givers, takers = _move(classes, c, sens, ranks, lower, move_upper, left)
        if not gain > _REL_TOL * scale:
            break
        ranks = ranks.copy()
        for j in givers:
            ranks[j] -= 1
        for i in takers:
            ranks[i] += 1
        ranks = fill(costs, ranks, upper, budget, sens)
    return ranks
