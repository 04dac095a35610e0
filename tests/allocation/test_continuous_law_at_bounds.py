"""closed_form.continuous_ranks when the budget covers every layer at its bound.

Documented in closed_form.py: "If even every layer at its upper bound fits, each layer with
s_i > 0 takes its bound": exactly its bound, not ``t w_i`` at ``t = up_i / w_i``, which can round
to one float below it, nor a water level bisected up to just below it.
"""
import numpy as np

from lorambo.allocation.closed_form import continuous_ranks


def _problems(seed, count):
    rng = np.random.default_rng(seed)
    for _ in range(count):
        n = int(rng.integers(1, 7))
        costs = rng.integers(2, 80, n)
        sens = rng.lognormal(0.0, 2.0, n)
        sens[rng.random(n) < 0.2] = 0.0
        sens[int(rng.integers(n))] = float(rng.lognormal(0.0, 2.0))  # at least one positive
        lower = rng.integers(0, 3, n)
        upper = lower + rng.integers(0, 9, n)
        yield costs, sens, lower, upper


def test_a_budget_that_covers_every_bound_gives_exactly_the_bounds():
    for costs, sens, lower, upper in _problems(20261207, 200):
        expected = np.where(sens > 0, upper, lower).astype(np.float64)
        full = int(np.dot(costs, expected))  # zero-sensitivity layers stay at their lower bound
        # the budget exactly at the bounds' cost, and past it
        for budget in (full, full + int(costs.min()), 10 * full + 1):
            x = continuous_ranks(costs, sens, lower, upper, budget)
            np.testing.assert_array_equal(x, expected, err_msg=str((costs, sens, lower, upper, budget)))


def test_one_parameter_short_of_the_bounds_leaves_a_layer_below_its_bound():
    # the other side of the boundary: the law then spends the budget, not the bounds' cost
    for costs, sens, lower, upper in _problems(7, 100):
        active = sens > 0
        full = int(np.dot(costs, np.where(active, upper, lower)))
        if not np.any(active & (upper > lower)):
            continue  # every positive layer pinned: nothing to spend less on
        x = continuous_ranks(costs, sens, lower, upper, full - 1)
        assert np.any(x[active] < upper[active])
        assert float(np.dot(costs, x)) <= full - 1 + 1e-9 * full
