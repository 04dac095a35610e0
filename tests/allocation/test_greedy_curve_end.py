"""A gain curve's end stops its layer in the greedy engine even where the rank bound is higher.

allocate tightens the bounds to the curve lengths first (curve_upper), so only a direct call shows
that curve_gain itself reads "no gain" past the end rather than failing or inventing one (found by
mutation testing)."""
import numpy as np

from lorambo.allocation.greedy import curve_gain, greedy_allocate


def test_ranks_past_the_end_of_a_curve_are_never_handed_out():
    rng = np.random.default_rng(20261207)
    curves = [np.sort(rng.uniform(0.5, 2.0, size))[::-1] for size in (2, 4, 1)]  # positive, non-increasing
    scale = rng.uniform(0.5, 3.0, 3)
    costs, upper = np.array([5, 7, 3]), np.array([6, 6, 6])  # every bound past its curve's end
    budget = 10 * int(costs @ upper)  # never the limit
    got = greedy_allocate(costs, np.zeros(3, dtype=np.int64), upper, budget, curve_gain(curves, scale))
    # every known gain is positive, so each layer takes exactly the ranks its curve knows
    assert got.tolist() == [2, 4, 1]
    assert curve_gain(curves, scale)(1, 4) == 0.0  # documented: no gain past the end, not an error
