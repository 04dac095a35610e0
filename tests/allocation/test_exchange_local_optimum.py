"""exchange.improve's promise checked by brute force, not against another implementation of it.

improve stops when no swap, split or merge lowers ``sum_i s_i / r_i`` (rank 0 counted as ``2 s_i``)
and the fill has nothing left to give. Here every such move from its result is enumerated and
priced with the loss written out, on problems of 2-5 layers: none may lower the loss, the budget
and the bounds hold, and no layer with s_i > 0 below its bound fits the leftover.
"""
import itertools

import numpy as np

from lorambo.allocation import exchange


def _loss(ranks, sens):
    return sum(s / r if r > 0 else 2.0 * s for r, s in zip(ranks.tolist(), sens.tolist()))


def _moves(n):
    """(givers, takers) of every swap, split and merge among n layers (a layer named twice moves two ranks)."""
    for j in range(n):
        others = [i for i in range(n) if i != j]
        for i in others:
            yield (j,), (i,)
        for pair in itertools.combinations_with_replacement(others, 2):
            yield (j,), pair
            yield pair, (j,)


def test_no_exchange_move_lowers_the_loss_of_improves_result():
    rng = np.random.default_rng(20261207)
    moved = 0
    for _ in range(300):
        n = int(rng.integers(2, 6))
        costs = rng.choice(rng.integers(2, 30, size=int(rng.integers(1, 4))), n).astype(np.int64)
        sens = rng.lognormal(0.0, 1.5, n)
        sens[rng.random(n) < 0.15] = 0.0
        sens[0] = sens[0] if sens.any() else 1.0
        sens = sens / sens.max()
        upper = rng.integers(1, 8, n)
        lower = np.minimum(upper, rng.integers(0, 3, n))
        take_upper = np.maximum(lower, upper - rng.integers(0, 2, n))  # moves stop below upper on some
        start = lower + (rng.random(n) * (upper - lower + 1)).astype(np.int64) // 2
        budget = int(np.dot(costs, start)) + int(rng.integers(0, 80))
        got = exchange.improve(costs, start, sens, lower, upper, budget, take_upper=take_upper)
        left = budget - int(np.dot(costs, got))
        assert left >= 0 and np.all(got >= lower) and np.all(got <= upper)
        assert not np.any((sens > 0) & (got < upper) & (costs <= left))  # the fill finished
        loss = _loss(got, sens)
        move_upper = np.minimum(upper, take_upper)
        for givers, takers in _moves(n):
            r = got.copy()
            for j in givers:
                r[j] -= 1
            for i in takers:
                r[i] += 1
            if np.any(r < lower) or any(r[i] > move_upper[i] or sens[i] == 0 for i in takers):
                continue
            if int(np.dot(costs, r)) <= budget:
                assert _loss(r, sens) >= loss - 1e-9, (costs, sens, start, lower, upper, take_upper, budget,
                                                       got, givers, takers)
        moved += bool(np.any(got != exchange.fill(costs, start, upper, budget, sens)))
    assert moved >= 30  # the moves changed the fill's answer on many problems, not just the fill ran


def test_improve_stops_at_the_first_move_that_gains_nothing(monkeypatch):
    # from its own result (a local optimum) improve asks for one move, finds no gain and stops,
    # rather than running to its safety bound of 10 n + 100 moves
    costs, sens = np.array([10, 5, 7, 10]), np.array([1.0, 0.3, 0.6, 0.05])
    lower, upper = np.zeros(4, np.int64), np.full(4, 6)
    settled = exchange.improve(costs, np.zeros(4, np.int64), sens, lower, upper, 97)
    calls = []
    real_move = exchange._move
    monkeypatch.setattr(exchange, "_move", lambda *a: calls.append(1) or real_move(*a))
    np.testing.assert_array_equal(exchange.improve(costs, settled, sens, lower, upper, 97), settled)
    assert len(calls) == 1
