"""greedy_allocate refuses starting ranks that already cost more than the budget, and accepts
starting ranks that cost exactly the budget (nothing is left to hand out, so they come back as
they are). The callers (allocate, exchange.fill, online growth) never pass such a start, so only a
direct call finds a check that was dropped or moved by one parameter (found by mutation testing)."""
import numpy as np
import pytest

from lorambo.allocation.greedy import greedy_allocate


def _gain(i, r):
    return 1.0 / (r + 1)  # positive and diminishing: any leftover budget would be spent


def test_a_start_that_costs_the_whole_budget_is_returned_unchanged():
    costs, start, upper = np.array([3, 5]), np.array([2, 1]), np.array([6, 6])
    spent = 3 * 2 + 5 * 1  # 11
    assert greedy_allocate(costs, start, upper, spent, _gain).tolist() == [2, 1]
    # one cheap rank more fits with 3 more parameters: the engine does spend leftover budget
    assert greedy_allocate(costs, start, upper, spent + 3, _gain).tolist() == [3, 1]


def test_a_start_that_costs_more_than_the_budget_is_refused():
    costs, start, upper = np.array([3, 5]), np.array([2, 1]), np.array([6, 6])
    with pytest.raises(ValueError, match=r"the starting ranks cost 11 > budget=10"):
        greedy_allocate(costs, start, upper, 10, _gain)
