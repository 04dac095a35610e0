"""exchange.fill on its own: the greedy fill by the exact loss drop per parameter.

The exchange moves that follow the fill in ``improve`` reach the same local optimum from most
fills, so a fill that ranks the next ranks wrongly went unnoticed there (found by mutation
testing); it alone decides past MAX_LAYERS layers or MAX_COSTS distinct costs. Here it is
checked against the loss drop written out, s/r - s/(r + 1) (s at r = 0), on every layer.
"""
import numpy as np

from lorambo.allocation import exchange
from lorambo.allocation.greedy import greedy_allocate


def _written_out_fill(costs, ranks, upper, budget, sens):
    def drop(i, r):
        s = float(sens[i])
        return s if r == 0 else s / (r * (r + 1))  # s/r - s/(r + 1)
    return greedy_allocate(costs, ranks, upper, budget, drop)


def test_fill_matches_the_loss_drop_greedy_from_random_starts():
    rng = np.random.default_rng(20261207)
    differs_from_start = 0
    for _ in range(400):
        n = int(rng.integers(1, 12))
        costs = rng.choice(rng.integers(2, 30, size=int(rng.integers(1, 4))), n).astype(np.int64)
        upper = rng.integers(0, 8, n)
        ranks = (rng.random(n) * (upper + 1)).astype(np.int64)  # anywhere in [0, upper], rank 0 included
        sens = rng.lognormal(0.0, 1.5, n)
        sens[rng.random(n) < 0.15] = 0.0
        budget = int(np.dot(costs, ranks)) + int(rng.integers(0, 120))
        got = exchange.fill(costs, ranks, upper, budget, sens)
        np.testing.assert_array_equal(got, _written_out_fill(costs, ranks, upper, budget, sens))
        assert int(np.dot(costs, got)) <= budget and np.all(got <= upper) and np.all(got >= ranks)
        differs_from_start += bool(np.any(got != ranks))
    assert differs_from_start >= 200  # the fill had ranks to hand out in most problems


def test_fill_ranks_a_first_rank_against_a_second_one_by_the_loss_drop():
    # one rank of budget 10 left: layer 0 at rank 1 (s = 3: drop 3/2 = 1.5) against layer 1 at
    # rank 0 (s = 1.2: drop 1.2); 0 wins. At s = 1.6 for layer 1 its first rank wins (1.6 > 1.5)
    costs, upper = np.array([10, 10]), np.array([4, 4])
    start = np.array([1, 0])
    assert exchange.fill(costs, start, upper, 20, np.array([3.0, 1.2])).tolist() == [2, 0]
    assert exchange.fill(costs, start, upper, 20, np.array([3.0, 1.6])).tolist() == [1, 1]


def test_improve_past_max_layers_is_the_fill_alone():
    # 1,100 layers of two shapes: past MAX_LAYERS, improve returns the fill's ranks unchanged
    rng = np.random.default_rng(5)
    n = exchange.MAX_LAYERS + 76
    costs = rng.choice(np.array([24, 40]), n).astype(np.int64)
    upper = np.full(n, 6)
    lower = np.zeros(n, dtype=np.int64)
    sens = rng.lognormal(0.0, 1.0, n)
    sens /= sens.max()
    start = rng.integers(0, 3, n)
    budget = int(np.dot(costs, start)) + 3000
    got = exchange.improve(costs, start, sens, lower, upper, budget)
    np.testing.assert_array_equal(got, _written_out_fill(costs, start, upper, budget, sens))


def test_a_split_whose_takers_cost_exactly_the_freed_budget():
    # costs 10, 5, 5, budget spent in full (ranks 2, 1, 1; s = 1, 0.7, 0.7). One rank of layer 0
    # frees 10 = 5 + 5: the split gives layers 1 and 2 one rank each, gain 0.35 + 0.35 - 0.5 > 0
    # (loss 1.9 -> 1.7), while a swap alone loses (0.35 - 0.5) and a merge too (1/6 - 1.4)
    args = (np.array([10, 5, 5]), np.array([2, 1, 1]), np.array([1.0, 0.7, 0.7]), np.zeros(3, np.int64),
            np.full(3, 8), 30)
    np.testing.assert_array_equal(exchange.improve(*args), [1, 2, 2])
