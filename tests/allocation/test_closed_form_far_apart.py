"""closed_form with sensitivities hundreds of orders of magnitude apart (subnormals included):
a layer far below the others must still get the budget they cannot take."""
import math

from hypothesis import given, settings
from hypothesis import strategies as st

from lorambo.allocation import allocate

FAST = settings(max_examples=60, deadline=None, database=None)


@st.composite
def split_problems(draw):
    """Layers of ordinary sensitivities ("big") and layers scaled down by one tiny factor ("small")."""
    n_big, n_small = draw(st.integers(1, 3)), draw(st.integers(1, 2))
    names = [f"big{i}" for i in range(n_big)] + [f"small{i}" for i in range(n_small)]
    dims = {nm: (draw(st.integers(1, 6)), draw(st.integers(1, 6))) for nm in names}
    sens = {nm: draw(st.floats(1.0, 10.0)) for nm in names}  # >= 1: 1e-323 of it is still > 0
    # the small ones end up 1e-120 to 1e-523 times the big ones, as subnormals too
    big_scale, factor = draw(st.sampled_from([1.0, 1e200])), draw(st.sampled_from([1e-120, 1e-310, 1e-323]))
    sens = {nm: s * big_scale if nm.startswith("big") else s * factor for nm, s in sens.items()}
    # low capacities on the big layers, and budgets past them: the tiny layers get the rest
    caps = {nm: draw(st.integers(0, min(2, *dims[nm]))) for nm in names if nm.startswith("big")}
    costs = {nm: d + k for nm, (d, k) in dims.items()}
    budget = draw(st.integers(min(costs.values()), sum(costs[nm] * min(dims[nm]) for nm in names) + 5))
    return dims, sens, caps, budget


@FAST
@given(split_problems())
def test_tiny_layers_take_what_the_others_leave(problem):
    dims, sens, caps, budget = problem
    small = [nm for nm in dims if nm.startswith("small")]
    ranks = allocate(dims, sens, budget, capacities=caps)
    costs = {nm: d + k for nm, (d, k) in dims.items()}
    left = budget - sum(costs[nm] * r for nm, r in ranks.items())
    # documented: the fill ends when no layer with s > 0 below its bound fits the leftover
    for nm, r in ranks.items():
        if r < min(min(dims[nm]), caps.get(nm, math.inf)):
            assert costs[nm] > left, (nm, ranks, left)
    # a rank of a big layer is worth more than any of a tiny one: the big layers rank as if the tiny
    # ones were 0, and the tiny ones split the rest by the law as they would at ordinary scale
    big_alone = allocate(dims, {nm: 0.0 if nm in small else s for nm, s in sens.items()}, budget, capacities=caps)
    assert {nm: ranks[nm] for nm in dims if nm not in small} == \
        {nm: big_alone[nm] for nm in dims if nm not in small}
    rest = budget - sum(costs[nm] * big_alone[nm] for nm in dims if nm not in small)
    if rest >= min(costs[nm] for nm in small):
        top = max(sens[nm] for nm in small)  # the small ones' own ratios, as ordinary numbers
        expected = allocate({nm: dims[nm] for nm in small}, {nm: sens[nm] / top for nm in small}, rest)
    else:
        expected = dict.fromkeys(small, 0)
    assert {nm: ranks[nm] for nm in small} == expected, (ranks, expected, rest)


def test_a_subnormal_sensitivity_fills_the_budget_left_by_capped_layers():
    dims = {"a": (4, 4), "b": (4, 4)}
    # a is capped at 2 ranks (16 parameters): 24 are left, three ranks of b
    for tiny in (1e-300, 5e-324):
        assert allocate(dims, {"a": 1.0, "b": tiny}, 40, capacities={"a": 2}) == {"a": 2, "b": 3}
    assert allocate(dims, {"a": 1e300, "b": 1e-300}, 40, capacities={"a": 2}) == {"a": 2, "b": 3}
