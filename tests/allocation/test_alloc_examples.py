"""Tiny instances whose answers are worked out by hand in the comments."""
import numpy as np
import pytest

from lorambo.allocation import allocate

TWIN = {"a": (10, 10), "b": (10, 10)}  # both cost c = 20 per rank


def test_closed_form_exact_proportions():
    # r_i* = P sqrt(s_i/c) / sum_j sqrt(s_j c) = 180 * sqrt(s_i) / (20 * (2 + 1)) -> 6 and 3.
    assert allocate(TWIN, {"a": 4.0, "b": 1.0}, 180) == {"a": 6, "b": 3}


def test_closed_form_cost_law():
    # Equal sensitivity: r ~ 1/sqrt(c); c = 10 vs 40 -> r_a = 2 r_b; 10 r_a + 40 r_b = 120 -> 4, 2.
    assert allocate({"a": (5, 5), "b": (20, 20)}, {"a": 1.0, "b": 1.0}, 120) == {"a": 4, "b": 2}


def test_closed_form_largest_remainder():
    # 200 -> 6.67 and 3.33; floors spend 180, the 20 left go to the larger fraction (a).
    assert allocate(TWIN, {"a": 4.0, "b": 1.0}, 200) == {"a": 7, "b": 3}


def test_closed_form_clip_and_renormalise():
    # a wants 6 but max_rank=5; the other 180 - 100 = 80 parameters go to b: 4 ranks.
    assert allocate(TWIN, {"a": 4.0, "b": 1.0}, 180, max_rank=5) == {"a": 5, "b": 4}
    # Same through a capacity on a only.
    assert allocate(TWIN, {"a": 4.0, "b": 1.0}, 180, capacities={"a": 5}) == {"a": 5, "b": 4}


def test_closed_form_min_rank_and_zero_sensitivity():
    # b has s = 0: it keeps min_rank = 1 and everything else (180 - 20 = 160) goes to a.
    assert allocate(TWIN, {"a": 1.0, "b": 0.0}, 180, min_rank=1) == {"a": 8, "b": 1}


def test_closed_form_greedy_fill_uses_cheap_layer():
    # c = 100 (a) and 16 (b), s = 100 and 1: w = 1 and 0.25, sum_j sqrt(s_j c_j) = 100 + 4 = 104.
    # Budget 208 gives exactly r* = 2 and 0.5 -> floors 2, 0 (200), b's rank does not fit (8 left).
    dims = {"a": (50, 50), "b": (8, 8)}
    assert allocate(dims, {"a": 100.0, "b": 1.0}, 208) == {"a": 2, "b": 0}
    # Budget 250: r* = 2.40 and 0.60; floors spend 200, largest remainder gives b one rank (34
    # left), a's second rank (100) never fits, so the fill gives b two more: 2 parameters unused.
    assert allocate(dims, {"a": 100.0, "b": 1.0}, 250) == {"a": 2, "b": 3}
    # With max_rank=1 for everyone the same budget leaves b at 1 and a clipped to 1: 134 unused.
    assert allocate(dims, {"a": 100.0, "b": 1.0}, 250, max_rank=1) == {"a": 1, "b": 1}


def test_uniform_water_level():
    # costs 10, 20, 30; upper 5, 10, 15. Level 11: 5*10 + 10*20 + 11*30 = 580 <= 600 < 610.
    dims = {"a": (5, 5), "b": (10, 10), "c": (15, 15)}
    assert allocate(dims, None, 600, method="uniform") == {"a": 5, "b": 10, "c": 11}


def test_uniform_top_up_goes_to_cheapest():
    # costs 20 and 10, level 3 spends 90; 15 left buys one more rank of the cheaper layer only.
    dims = {"a": (10, 10), "b": (5, 5)}
    assert allocate(dims, {"a": 9.0, "b": 0.0}, 105, method="uniform") == {"a": 3, "b": 4}


def test_frobenius_water_filling():
    # c = 4 each, budget buys 3 ranks. Gains sigma^2: a 9, 1; b 4, 4 -> take 9, 4, 4.
    dims = {"a": (2, 2), "b": (2, 2)}
    spectra = {"a": np.array([3.0, 1.0]), "b": np.array([2.0, 2.0])}
    assert allocate(dims, {"a": 1, "b": 1}, 12, method="frobenius_greedy", spectra=spectra) == {"a": 1, "b": 2}
    # Sensitivity 10 on a: gains a 90, 10 beat b's 4, 4 -> a 2, b 1.
    assert allocate(dims, {"a": 10, "b": 1}, 12, method="frobenius_greedy", spectra=spectra) == {"a": 2, "b": 1}


def test_frobenius_stops_without_positive_gain():
    # Rank-1 matrices: the second singular value is 0, so no second rank although budget remains.
    dims = {"a": (3, 3), "b": (3, 3)}
    spectra = {"a": [5.0, 0.0, 0.0], "b": [1.0, 0.0, 0.0]}
    assert allocate(dims, {"a": 1, "b": 1}, 600, method="frobenius_greedy", spectra=spectra) == {"a": 1, "b": 1}


def test_knapsack_greedy_vs_exact():
    # a: c = 4, one rank worth 5 (ratio 1.25); b: c = 10, first rank worth 11 (ratio 1.1).
    # Greedy takes a first, then b no longer fits: value 5. The optimum is b alone: 11.
    dims = {"a": (1, 3), "b": (5, 5)}
    benefits = {"a": [5.0], "b": [11.0, 10.0, 9.0]}
    assert allocate(dims, None, 10, method="knapsack", benefits=benefits) == {"a": 1, "b": 0}
    assert allocate(dims, None, 10, method="knapsack", benefits=benefits, exact=True) == {"a": 0, "b": 1}


def test_knapsack_indexing_is_absolute_rank():
    # benefits[r] is the gain of rank r -> r + 1; with min_rank=1 entry 0 is never used.
    # Equal costs 4, budget 12 = 3 ranks: both start at 1; the third rank compares entry 1 only:
    # a 2.0 vs b 0.5 -> a, then a 2.0 vs b 3.0 -> b (a's huge entry 0 plays no part).
    dims = {"a": (2, 2), "b": (2, 2)}
    benefits = {"a": [100.0, 2.0], "b": [1.0, 0.5]}
    assert allocate(dims, None, 12, method="knapsack", benefits=benefits, min_rank=1) == {"a": 2, "b": 1}
    benefits = {"a": [100.0, 2.0], "b": [5.0, 3.0]}
    assert allocate(dims, None, 12, method="knapsack", benefits=benefits, min_rank=1) == {"a": 1, "b": 2}


def test_knapsack_short_curve_limits_rank():
    # Only 2 gains known for a: it never gets a third rank, whatever the budget.
    dims = {"a": (8, 8), "b": (1, 1)}
    assert allocate(dims, None, 1000, method="knapsack", benefits={"a": [3.0, 2.0], "b": [1.0]}) == {"a": 2, "b": 1}


def test_data_weighted():
    # Gains E[r] - E[r+1]: a 6, 3, 1; b 5, 1, scaled by s = 1 and 4 -> b 20, 4. c = 6, 3 ranks.
    dims = {"a": (3, 3), "b": (3, 3)}
    tails = {"a": [10.0, 4.0, 1.0, 0.0], "b": [6.0, 1.0, 0.0]}
    assert allocate(dims, {"a": 1, "b": 4}, 18, method="data_weighted", tail_energies=tails) == {"a": 1, "b": 2}
    # Unit sensitivities: 6 (a), 5 (b), 3 (a) -> a 2, b 1.
    assert allocate(dims, {"a": 1, "b": 1}, 18, method="data_weighted", tail_energies=tails) == {"a": 2, "b": 1}


@pytest.mark.parametrize("method", ["uniform", "closed_form"])
def test_result_types_and_order(method):
    dims = {"z": (6, 4), "a": (3, 9), "m": (5, 5)}
    out = allocate(dims, {"z": 1.0, "a": 2.0, "m": 3.0}, 100.7, method=method)
    assert list(out) == ["z", "a", "m"]
    assert all(type(v) is int for v in out.values())
    assert sum(out[n] * sum(dims[n]) for n in dims) <= 100
