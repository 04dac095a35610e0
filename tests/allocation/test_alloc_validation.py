"""Every bad input to lorambo.allocation.allocate is a ValueError naming the layer and/or value."""
import math

import pytest

from lorambo.allocation import allocate

DIMS = {"q_proj": (8, 8), "v_proj": (4, 12)}  # costs 16 and 16, full ranks 8 and 4
SENS = {"q_proj": 1.0, "v_proj": 2.0}


def test_empty_dims():
    with pytest.raises(ValueError, match="dims is empty"):
        allocate({}, {}, 100)


@pytest.mark.parametrize("dk", [(0, 8), (8, -1), (8,), (8, 8.0), "88", (True, 8)])
def test_bad_dims(dk):
    with pytest.raises(ValueError, match=r"dims\['bad'\]"):
        allocate({"q_proj": (8, 8), "bad": dk}, {"q_proj": 1.0, "bad": 1.0}, 100)


@pytest.mark.parametrize("value", [-0.5, math.nan, math.inf, -math.inf])
def test_bad_sensitivity_names_layer_and_value(value):
    with pytest.raises(ValueError, match=rf"'v_proj' is {value!r}"):
        allocate(DIMS, {"q_proj": 1.0, "v_proj": value}, 100)


def test_numbers_beyond_the_float_range_name_the_argument():
    # before: OverflowError "int too large to convert to float", naming neither layer nor argument
    with pytest.raises(ValueError, match=r"sensitivity for layer 'v_proj' is 10000000\.\.\. \(a number of 401 "
                                         r"digits\): expected a finite real number"):
        allocate(DIMS, {"q_proj": 1.0, "v_proj": 10**400}, 100)
    with pytest.raises(ValueError, match=r"budget=10000000\.\.\. \(a number of 401 digits\) must be finite"):
        allocate(DIMS, SENS, 10**400)


def test_sensitivity_not_a_number():
    with pytest.raises(ValueError, match=r"'v_proj' is 'high'"):
        allocate(DIMS, {"q_proj": 1.0, "v_proj": "high"}, 100)


def test_sensitivity_for_unknown_layer():
    with pytest.raises(ValueError, match=r"unknown layer.*'k_proj'"):
        allocate(DIMS, {**SENS, "k_proj": 1.0}, 100)


def test_sensitivity_missing_for_known_layer():
    with pytest.raises(ValueError, match=r"missing.*'v_proj'"):
        allocate(DIMS, {"q_proj": 1.0}, 100)


@pytest.mark.parametrize("method", ["closed_form", "frobenius_greedy", "data_weighted"])
def test_sensitivities_required(method):
    with pytest.raises(ValueError, match="needs sensitivities"):
        allocate(DIMS, None, 100, method=method)


def test_budget_below_one_rank_of_cheapest_layer():
    dims = {"big": (100, 100), "small": (3, 4)}
    with pytest.raises(ValueError, match=r"budget=6 .*'small' \(d \+ k = 7\)"):
        allocate(dims, {"big": 1.0, "small": 1.0}, 6)


def test_budget_below_min_rank_everywhere():
    # min_rank=2 costs 2 * (16 + 16) = 64
    with pytest.raises(ValueError, match=r"budget=63 .*min_rank=2.*64"):
        allocate(DIMS, SENS, 63, min_rank=2)


@pytest.mark.parametrize("budget", [-1, math.nan, math.inf, "100", True])
def test_bad_budget(budget):
    with pytest.raises(ValueError, match="budget="):
        allocate(DIMS, SENS, budget)


def test_min_rank_above_max_rank():
    with pytest.raises(ValueError, match="min_rank=3 > max_rank=2"):
        allocate(DIMS, SENS, 1000, min_rank=3, max_rank=2)


@pytest.mark.parametrize("kw", [{"min_rank": -1}, {"min_rank": 1.5}, {"max_rank": -2}, {"max_rank": 4.0}])
def test_bad_rank_bounds(kw):
    key, value = next(iter(kw.items()))
    with pytest.raises(ValueError, match=rf"{key}={value!r}"):
        allocate(DIMS, SENS, 1000, **kw)


def test_capacity_too_small_for_min_rank():
    with pytest.raises(ValueError, match=r"capacities\['v_proj'\] = 1 is a capacity too small for the requested rank"):
        allocate(DIMS, SENS, 1000, min_rank=2, capacities={"v_proj": 1})


def test_capacity_for_unknown_layer():
    with pytest.raises(ValueError, match=r"capacities.*unknown.*'o_proj'"):
        allocate(DIMS, SENS, 1000, capacities={"o_proj": 8})


def test_min_rank_above_full_rank():
    with pytest.raises(ValueError, match=r"min_rank=5 exceeds the full rank .* 4 of layer 'v_proj'"):
        allocate(DIMS, SENS, 1000, min_rank=5)


def test_unknown_method_lists_valid_ones():
    with pytest.raises(ValueError, match=r"unknown method 'sqrt'.*closed_form.*knapsack"):
        allocate(DIMS, SENS, 100, method="sqrt")


def test_exact_only_for_gain_methods():
    with pytest.raises(ValueError, match="exact=True applies only"):
        allocate(DIMS, SENS, 100, method="closed_form", exact=True)


def test_all_zero_sensitivities_closed_form():
    with pytest.raises(ValueError, match="all sensitivities are zero"):
        allocate(DIMS, {"q_proj": 0.0, "v_proj": 0.0}, 100)


@pytest.mark.parametrize("method,kw", [("frobenius_greedy", "spectra"), ("knapsack", "benefits"),
                                       ("data_weighted", "tail_energies")])
def test_curves_missing(method, kw):
    with pytest.raises(ValueError, match=rf"needs {kw}"):
        allocate(DIMS, SENS, 100, method=method)
    with pytest.raises(ValueError, match=rf"{kw} missing for layer.*'v_proj'"):
        allocate(DIMS, SENS, 100, method=method, **{kw: {"q_proj": [3.0, 2.0, 1.0]}})


@pytest.mark.parametrize("method,kw,curve", [
    ("frobenius_greedy", "spectra", [1.0, 2.0]),        # not sorted
    ("frobenius_greedy", "spectra", [1.0, -0.5]),       # negative singular value
    ("knapsack", "benefits", [1.0, 3.0]),               # increasing gains: not concave
    ("knapsack", "benefits", [1.0, math.nan]),
    ("data_weighted", "tail_energies", [5.0, 6.0]),     # error grows with rank
    ("data_weighted", "tail_energies", [5.0, 4.0, 1.0]),  # decrements 1 then 3: not convex
    ("data_weighted", "tail_energies", []),
    ("knapsack", "benefits", [[1.0, 0.5]]),             # 2-D
])
def test_bad_curves_name_the_layer(method, kw, curve):
    with pytest.raises(ValueError, match=rf"{kw}.*\['v_proj'\]"):
        allocate(DIMS, SENS, 100, method=method, **{kw: {"q_proj": [3.0, 2.0, 1.0], "v_proj": curve}})


def test_exact_dp_too_large():
    dims = {"a": (4096, 4096), "b": (4096, 4097)}  # gcd(8192, 8193) = 1
    with pytest.raises(ValueError, match="DP states"):
        allocate(dims, None, 10_000_000, method="knapsack", exact=True,
                 benefits={"a": [1.0] * 4096, "b": [1.0] * 4096})


def test_estimates_passed_as_they_came_say_how_to_pass_them():
    # before: "... is Estimate(value=..., ...): expected a real number", not saying what to pass
    import torch
    from torch import nn

    from lorambo.sensitivity import hessian_trace

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    estimates = hessian_trace(model, lambda m, x: m(x).pow(2).mean(), [torch.randn(4, 6)], num_probes=2)
    dims = {"0": (8, 6), "2": (3, 8)}
    with pytest.raises(ValueError, match=r"sensitivity for layer '0' is Estimate\(value=.*expected a real number; "
                                         r"pass the estimates' values, \{name: e.value for name, e in "
                                         r"estimates.items\(\)\}"):
        allocate(dims, estimates, budget=40)
    assert sum(allocate(dims, {n: e.value for n, e in estimates.items()}, budget=40).values()) > 0


@pytest.mark.parametrize("method, curve", [("uniform", "spectra"), ("closed_form", "benefits"),
                                           ("frobenius_greedy", "tail_energies"), ("data_weighted", "spectra"),
                                           ("knapsack", "tail_energies")])
def test_a_curve_given_to_a_method_that_does_not_read_it_is_refused(method, curve):
    """Each curve has one reader (spectra: frobenius_greedy, benefits: knapsack, tail_energies:
    data_weighted); given to another method it would be ignored while the ranks pass every check."""
    dims = {"a": (4, 4), "b": (3, 5)}
    own = {"frobenius_greedy": {"spectra": {"a": [2.0, 1.0], "b": [1.0]}},
           "knapsack": {"benefits": {"a": [2.0, 1.0], "b": [1.5]}},
           "data_weighted": {"tail_energies": {"a": [3.0, 1.0, 0.0], "b": [2.0, 0.5]}}}.get(method, {})
    stray = {curve: {"a": [3.0, 2.0, 1.0], "b": [1.0, 0.5]}}
    with pytest.raises(ValueError, match=rf"allocate: {curve}= is read only by method='\w+', and "
                                         rf"method='{method}' would ignore it"):
        allocate(dims, {"a": 1.0, "b": 2.0}, 40, method=method, **own, **stray)


def test_a_curve_that_rises_names_its_entries_as_plain_numbers():
    """The message read 'entry 1 = np.float64(2.5) > entry 0 = np.float64(1.5)' under numpy 2."""
    with pytest.raises(ValueError, match=r"entry 1 = 2\.5 > entry 0 = 1\.5$"):
        allocate(DIMS, SENS, 100, method="knapsack", benefits={"q_proj": [3.0, 2.0], "v_proj": [1.5, 2.5]})
