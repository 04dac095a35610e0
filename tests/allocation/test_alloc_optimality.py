"""Optimality: the DP against brute force, the greedy against the DP, the clipped square-root law
against a naive clip-and-renormalise loop."""
import itertools
import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from lorambo.allocation import allocate
from lorambo.allocation.closed_form import continuous_ranks

FAST = settings(max_examples=60, deadline=None, database=None)  # < 30 s total on 2 cores


@st.composite
def knapsacks(draw, max_layers=4, max_dim=6, equal_costs=False):
    n = draw(st.integers(1, max_layers))
    min_rank = draw(st.integers(0, 1))
    shared = (draw(st.integers(1, max_dim)), draw(st.integers(1, max_dim)))
    dims, benefits = {}, {}
    for i in range(n):
        d, k = shared if equal_costs else (draw(st.integers(1, max_dim)), draw(st.integers(1, max_dim)))
        dims[f"l{i}"] = (max(d, min_rank), max(k, min_rank))
        gains = draw(st.lists(st.floats(-2, 20, allow_subnormal=False), max_size=max_dim + 1))
        benefits[f"l{i}"] = sorted(gains, reverse=True)  # non-increasing = concave
    costs = [d + k for d, k in dims.values()]
    lo = max(min(costs), min_rank * sum(costs))
    budget = draw(st.integers(lo, lo + 60))
    max_rank = draw(st.one_of(st.none(), st.integers(min_rank, max_dim)))
    return dims, benefits, budget, dict(min_rank=min_rank, max_rank=max_rank)


def value(ranks, benefits, min_rank):
    return sum(sum(benefits[nm][min_rank:r]) for nm, r in ranks.items())


def spent(dims, ranks):
    return sum(r * sum(dims[nm]) for nm, r in ranks.items())


def brute_force(dims, benefits, budget, min_rank, max_rank):
    names = list(dims)
    ups = [min(min(dims[nm]), len(benefits[nm]) if len(benefits[nm]) > min_rank else min_rank,
               max_rank if max_rank is not None else math.inf) for nm in names]
    best = -math.inf
    for combo in itertools.product(*[range(min_rank, max(min_rank, u) + 1) for u in ups]):
        ranks = dict(zip(names, combo))
        if spent(dims, ranks) <= budget:
            best = max(best, value(ranks, benefits, min_rank))
    return best


@FAST
@given(knapsacks(max_layers=3, max_dim=4))
def test_exact_dp_matches_brute_force(prob):
    dims, benefits, budget, kw = prob
    ranks = allocate(dims, None, budget, "knapsack", benefits=benefits, exact=True, **kw)
    assert spent(dims, ranks) <= budget
    best = brute_force(dims, benefits, budget, kw["min_rank"], kw["max_rank"])
    assert math.isclose(value(ranks, benefits, kw["min_rank"]), best, rel_tol=1e-9, abs_tol=1e-9)


@FAST
@given(knapsacks(max_layers=3, max_dim=4), st.sampled_from([10**9, 10**15, 1e30]))
def test_exact_dp_with_budget_past_full_capacity(prob, budget):
    """A budget larger than every layer at full rank is a tiny problem, not a huge DP: exact=True
    solves it (it refused it as needing ~budget / gcd(d + k) states) and matches brute force."""
    dims, benefits, _, kw = prob
    ranks = allocate(dims, None, budget, "knapsack", benefits=benefits, exact=True, **kw)
    best = brute_force(dims, benefits, budget, kw["min_rank"], kw["max_rank"])
    assert math.isclose(value(ranks, benefits, kw["min_rank"]), best, rel_tol=1e-9, abs_tol=1e-9)



def test_exact_dp_axis_counts_only_ranks_above_min_rank():
    """The DP axis caps the leftover at the ranks between min_rank and each bound: two layers at
    min_rank=999 of 1,000 (d + k = 2,001 and 2,003, gcd 1) need ~4,000 states, not the ~8 million
    that counting their min_rank ranks too would refuse; the best layer takes the last rank."""
    dims = {"a": (1000, 1001), "b": (1000, 1003)}
    benefits = {"a": [1.0] * 1000, "b": [2.0] * 1000}
    ranks = allocate(dims, None, 10**7, "knapsack", benefits=benefits, exact=True, min_rank=999)
    assert ranks == {"a": 1000, "b": 1000}
    squeezed = 999 * 4004 + 2003  # room for one more rank of b only
    assert allocate(dims, None, squeezed, "knapsack", benefits=benefits, exact=True,
                    min_rank=999) == {"a": 999, "b": 1000}

@FAST
@given(knapsacks())
def test_greedy_within_one_item_of_optimum(prob):
    """Fractional-knapsack rounding bound: greedy >= OPT - (largest single rank gain)."""
    dims, benefits, budget, kw = prob
    greedy = allocate(dims, None, budget, "knapsack", benefits=benefits, **kw)
    exact = allocate(dims, None, budget, "knapsack", benefits=benefits, exact=True, **kw)
    g, opt = value(greedy, benefits, kw["min_rank"]), value(exact, benefits, kw["min_rank"])
    items = [b for nm in dims for b in benefits[nm][kw["min_rank"]:min(dims[nm])]] + [0.0]
    assert opt >= g - 1e-9
    assert g >= opt - max(items) - 1e-9


@FAST
@given(knapsacks(equal_costs=True))
def test_greedy_optimal_with_equal_costs(prob):
    dims, benefits, budget, kw = prob
    greedy = allocate(dims, None, budget, "knapsack", benefits=benefits, **kw)
    exact = allocate(dims, None, budget, "knapsack", benefits=benefits, exact=True, **kw)
    assert math.isclose(value(greedy, benefits, kw["min_rank"]), value(exact, benefits, kw["min_rank"]),
                        rel_tol=1e-9, abs_tol=1e-9)


@FAST
@given(knapsacks(), st.lists(st.floats(0, 5), min_size=4, max_size=4))
def test_frobenius_exact_never_worse_than_greedy(prob, sens_list):
    dims, benefits, budget, kw = prob
    sens = dict(zip(dims, sens_list))
    spectra = {nm: sorted((abs(x) ** 0.5 for x in benefits[nm]), reverse=True) for nm in dims}
    gains = {nm: [sens[nm] * s * s for s in spectra[nm]] for nm in dims}
    args = dict(method="frobenius_greedy", spectra=spectra, **kw)
    g = value(allocate(dims, sens, budget, **args), gains, kw["min_rank"])
    opt = value(allocate(dims, sens, budget, exact=True, **args), gains, kw["min_rank"])
    assert opt >= g - 1e-9


def naive_capped_law(c, s, up, budget):
    """Clip-and-renormalise with upper bounds only (min_rank = 0): cap the violators, re-spread
    the rest of the budget over the others by the square-root law, repeat until none violates."""
    w = np.sqrt(s / c)
    capped = np.zeros(len(c), dtype=bool)
    while True:
        free = ~capped & (w > 0)
        x = np.where(capped, up, 0.0)
        rest = budget - np.sum(c[capped] * up[capped])
        if free.any():
            x[free] = rest * w[free] / np.sum(w[free] * c[free])
        over = free & (x > up)
        if not over.any():
            return x
        capped |= over


@st.composite
def capped_laws(draw):
    n = draw(st.integers(1, 6))
    d = np.array([draw(st.integers(1, 40)) for _ in range(n)])
    k = np.array([draw(st.integers(1, 40)) for _ in range(n)])
    s = np.array([draw(st.one_of(st.just(0.0), st.floats(1e-3, 50.0))) for _ in range(n)])
    s[draw(st.integers(0, n - 1))] = draw(st.floats(1e-3, 50.0))
    up = np.minimum(np.minimum(d, k), [draw(st.integers(0, 40)) for _ in range(n)])
    c = d + k
    budget = draw(st.integers(int(c.min()), int(np.sum(c * np.minimum(d, k))) + 5))
    return d, k, s, up, budget


@FAST
@given(capped_laws())
def test_clipped_law_matches_naive_renormalisation(prob):
    d, k, s, up, budget = prob
    c = d + k
    ref = naive_capped_law(c.astype(float), s, up.astype(float), budget)
    got = continuous_ranks(c, s, np.zeros_like(c), up, budget)
    np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-9)
    # ... and the integers stay on it: never below the floor of the clipped law.
    names = [f"l{i}" for i in range(len(c))]
    ranks = allocate({nm: (int(a), int(b)) for nm, a, b in zip(names, d, k)}, dict(zip(names, s)), budget,
                     capacities={nm: int(u) for nm, u in zip(names, up)})
    assert all(ranks[nm] > x - 1 - 1e-9 for nm, x in zip(names, ref))


@FAST
@given(capped_laws(), st.integers(0, 2))
def test_clipped_law_kkt_with_min_rank(prob, min_rank):
    """x_i = clip(t w_i, lo, up) for one level t, spending the whole budget unless all are capped."""
    d, k, s, up, budget = prob
    c = d + k
    up = np.maximum(up, min_rank)
    budget = max(budget, min_rank * int(c.sum()))
    lo = np.full_like(c, min_rank)
    x = continuous_ranks(c, s, lo, up, budget)
    assert np.all((x >= lo - 1e-12) & (x <= up + 1e-12))
    w = np.sqrt(s / c)
    pos, pinned = w > 0, up == lo
    free = pos & (x > lo + 1e-9) & (x < up - 1e-9)
    at_up = pos & ~pinned & (x >= up - 1e-9)
    at_lo = pos & ~pinned & (x <= lo + 1e-9)
    if free.any():
        t = x[free] / w[free]
        np.testing.assert_allclose(t, t[0], rtol=1e-9)
        assert np.all(up[at_up] <= t[0] * w[at_up] + 1e-6)  # capped ones want more than the bound
        assert np.all(lo[at_lo] >= t[0] * w[at_lo] - 1e-6)  # floored ones want less
    positive_capped = np.all(x[w > 0] >= up[w > 0] - 1e-9)
    assert positive_capped or math.isclose(float(np.sum(c * x)), budget, rel_tol=1e-9)
    assert float(np.sum(c * x)) <= budget * (1 + 1e-12)
    assert np.all(x[w == 0] == lo[w == 0])


@FAST
@given(capped_laws(), st.integers(0, 5), st.floats(1.0, 10.0))
def test_continuous_law_monotone_in_sensitivity(prob, which, factor):
    """Raising s_i never lowers the continuous rank of layer i (with bounds and renormalisation)."""
    d, k, s, up, budget = prob
    c = d + k
    i = which % len(c)
    raised = s.copy()
    raised[i] = max(s[i], 1e-3) * factor
    lo = np.zeros_like(c)
    assert continuous_ranks(c, raised, lo, up, budget)[i] >= continuous_ranks(c, s, lo, up, budget)[i] - 1e-9
