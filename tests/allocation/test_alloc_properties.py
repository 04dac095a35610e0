"""Hypothesis properties of allocate() for every method: budget, bounds, budget use, monotonicity."""
import math

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from lorambo.allocation import METHODS, allocate
from lorambo.allocation.api import CURVE_READERS

FAST = settings(max_examples=60, deadline=None, database=None)  # < 30 s total on 2 cores
SENS = st.one_of(st.just(0.0), st.floats(1e-3, 100.0))


@st.composite
def problems(draw, max_layers=5, max_dim=12):
    """A valid random instance plus the curves every method may need."""
    n = draw(st.integers(1, max_layers))
    min_rank = draw(st.integers(0, 2))
    names = [f"layer{i}" for i in range(n)]
    dims = {nm: (draw(st.integers(max(1, min_rank), max_dim)), draw(st.integers(max(1, min_rank), max_dim)))
            for nm in names}
    sens = {nm: draw(SENS) for nm in names}
    sens[names[draw(st.integers(0, n - 1))]] = draw(st.floats(1e-3, 100.0))  # one positive
    max_rank = draw(st.one_of(st.none(), st.integers(min_rank, max_dim)))
    capacities = {nm: draw(st.integers(min_rank, max_dim)) for nm in names if draw(st.booleans())}
    costs = [d + k for d, k in dims.values()]
    floor_cost = max(min(costs), min_rank * sum(costs))
    top = sum(c * min(dims[nm]) for c, nm in zip(costs, names))
    budget = draw(st.integers(floor_cost, max(floor_cost, top + 10)))
    spectra, benefits, tails = {}, {}, {}
    for nm in names:
        m = min(dims[nm])
        spectra[nm] = sorted(draw(st.lists(st.floats(0, 10), min_size=0, max_size=m)), reverse=True)
        benefits[nm] = sorted(draw(st.lists(st.floats(-1, 10), min_size=0, max_size=m + 2)), reverse=True)
        lam = sorted(draw(st.lists(st.floats(0, 10), min_size=0, max_size=m)), reverse=True)
        tails[nm] = [sum(lam[r:]) for r in range(len(lam) + 1)]  # E[r] = sum_{j >= r} lambda_j
    kw = dict(min_rank=min_rank, max_rank=max_rank, capacities=capacities)
    curves = dict(spectra=spectra, benefits=benefits, tail_energies=tails)
    return dims, sens, budget, kw, curves


def read_by(method, curves):
    """The curve ``method`` reads (allocate refuses the others)."""
    return {what: c for what, c in curves.items() if CURVE_READERS[what] == method}


def upper_bounds(dims, kw):
    caps = kw["capacities"]
    return {nm: min(min(d, k), kw["max_rank"] if kw["max_rank"] is not None else math.inf,
                    caps.get(nm, math.inf)) for nm, (d, k) in dims.items()}


def spent(dims, ranks):
    return sum(ranks[nm] * (d + k) for nm, (d, k) in dims.items())


@FAST
@given(problems(), st.sampled_from(METHODS), st.booleans())
def test_budget_and_bounds_every_method(prob, method, exact):
    dims, sens, budget, kw, curves = prob
    exact = exact and method in ("frobenius_greedy", "knapsack", "data_weighted")
    ranks = allocate(dims, sens, budget, method, **kw, **read_by(method, curves), exact=exact)
    assert list(ranks) == list(dims)
    assert spent(dims, ranks) <= budget
    up = upper_bounds(dims, kw)
    for nm, r in ranks.items():
        assert type(r) is int and kw["min_rank"] <= r <= up[nm]


@FAST
@given(problems())
def test_closed_form_spends_nearly_all(prob):
    dims, sens, budget, kw, _ = prob
    ranks = allocate(dims, sens, budget, "closed_form", **kw)
    up = upper_bounds(dims, kw)
    growable = [sum(dims[nm]) for nm in dims if ranks[nm] < up[nm] and sens[nm] > 0]
    # Documented: the leftover is below the cost of every positive-sensitivity layer not at its bound
    # (and so below the largest such cost, the looser promise).
    assert all(budget - spent(dims, ranks) < c for c in growable)


@FAST
@given(problems())
def test_uniform_is_a_water_level_and_spends_nearly_all(prob):
    dims, sens, budget, kw, _ = prob
    ranks = allocate(dims, sens, budget, "uniform", **kw)
    up = upper_bounds(dims, kw)
    free = [nm for nm in dims if ranks[nm] < up[nm]]
    if free:
        assert budget - spent(dims, ranks) < max(sum(dims[nm]) for nm in free)
        level = min(ranks[nm] for nm in free)
        assert all(ranks[nm] <= level + 1 for nm in free)  # uncapped layers differ by <= 1
        # A capped layer is capped because its bound is at or below the level everyone else gets.
        assert all(up[nm] <= level + 1 for nm in dims if nm not in free)


@st.composite
def unclipped(draw, equal_costs=False):
    """Instances where the continuous square-root law needs no clipping (min_rank=0, no caps)."""
    n = draw(st.integers(1, 6))
    dk = (draw(st.integers(8, 64)), draw(st.integers(8, 64)))
    dims = {f"l{i}": dk if equal_costs else (draw(st.integers(8, 64)), draw(st.integers(8, 64)))
            for i in range(n)}
    sens = {nm: draw(st.floats(1e-2, 100.0)) for nm in dims}
    c = {nm: sum(dims[nm]) for nm in dims}
    norm = sum(math.sqrt(sens[nm] * c[nm]) for nm in dims)
    # r_i* = B w_i / norm <= min(d_i, k_i) for every i  <=>  B <= min_i min(d_i,k_i) norm / w_i
    b_max = min(min(dims[nm]) * norm / math.sqrt(sens[nm] / c[nm]) for nm in dims)
    budget = int(b_max * draw(st.floats(0.05, 1.0)))
    assume(budget >= min(c.values()))
    star = {nm: budget * math.sqrt(sens[nm] / c[nm]) / norm for nm in dims}
    return dims, sens, budget, star


@FAST
@given(unclipped())
def test_closed_form_follows_square_root_law(prob):
    dims, sens, budget, star = prob
    ranks = allocate(dims, sens, budget)
    c = {nm: sum(dims[nm]) for nm in dims}
    for nm in dims:
        assert ranks[nm] > star[nm] - 1 - 1e-9  # never below the floor of r*
        # Anything above r* is paid for by the other layers' rounding slack (< 1 rank each).
        others = sum(c[o] for o in dims if o != nm)
        assert (ranks[nm] - star[nm]) * c[nm] <= others + 1e-6


@FAST
@given(unclipped(equal_costs=True))
def test_closed_form_equal_costs_within_one_rank(prob):
    dims, sens, budget, star = prob
    ranks = allocate(dims, sens, budget)
    assert all(abs(ranks[nm] - star[nm]) < 1 + 1e-9 for nm in dims)


@FAST
@given(problems(), st.sampled_from(["closed_form", "frobenius_greedy", "data_weighted"]),
       st.floats(1.01, 10.0))
def test_more_sensitive_twin_never_gets_less(prob, method, factor):
    """Two layers identical in shape, bounds and curve: the more sensitive one gets >= rank.

    (Raising one s_i with everything else fixed is not guaranteed to keep r_i: integer effects can
    take a rank, as the closed form's rounding once did for dims {(2,10), (3,7), (10,4)}, budget
    45; the twin property is the one that always holds.)
    """
    dims, sens, budget, kw, curves = prob
    names = list(dims)
    assume(len(names) >= 2)
    a, b = names[0], names[1]
    dims = {**dims, b: dims[a]}
    kw["capacities"].pop(b, None)
    if a in kw["capacities"]:
        kw["capacities"][b] = kw["capacities"][a]
    for key in curves:
        curves[key][b] = curves[key][a]
    sens = {**sens, b: sens[b] if sens[b] > 0 else 1.0}
    sens[a] = sens[b] * factor
    costs = [sum(dk) for dk in dims.values()]
    budget = max(budget, min(costs), kw["min_rank"] * sum(costs))
    ranks = allocate(dims, sens, budget, method, **kw, **read_by(method, curves))
    assert ranks[a] >= ranks[b]


def test_raising_one_sensitivity_old_counterexample():
    """The rounding by largest remainder + greedy fill alone took a rank from l1 when l1's
    sensitivity rose ({2, 2, 0} -> {1, 1, 1}, proxy loss 14.8 where {2, 2, 0} costs 9.6); the
    exchange moves keep {2, 2, 0}. Either way l1 stays above the floor of its old continuous
    rank (the continuous rank is monotone in s_i and the integers never drop below its floor)."""
    dims = {"l0": (2, 10), "l1": (3, 7), "l2": (10, 4)}
    s = {"l0": 7.554796409908462, "l1": 2.224117393669527, "l2": 1.4402314516962855}
    before = allocate(dims, s, 45)
    after = allocate(dims, {**s, "l1": 5.792506127010144}, 45)
    assert before == after == {"l0": 2, "l1": 2, "l2": 0}
    # the continuous optimum of l1 did grow
    c = {nm: sum(dims[nm]) for nm in dims}

    def x(ss, nm):  # unclipped square-root law (l1's r* ~ 1.1 < its full rank 3)
        return 45 * math.sqrt(ss[nm] / c[nm]) / sum(math.sqrt(ss[o] * c[o]) for o in dims)

    assert x({**s, "l1": 5.792506127010144}, "l1") > x(s, "l1")
    assert after["l1"] >= math.floor(x(s, "l1"))
