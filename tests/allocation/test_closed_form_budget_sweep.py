"""The closed form's loss against the budget: a larger budget never gives a worse allocation.

Small problems are solved exactly (``closed_form.EXACT_CELLS``), so their proxy loss
``sum_i s_i / r_i`` (``2 s_i`` at rank 0) is non-increasing in the budget. With the rounding forced
(largest remainder, fill, exchange moves) each allocation is within the gap documented in
lorambo/allocation/closed_form.py of the brute-force optimum. The brute force enumerates every
rank vector within the bounds, independently of the dynamic program.
"""
import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lorambo.allocation import allocate, closed_form

SWEEP = settings(max_examples=40, deadline=None, database=None)
ROUNDING_WORST_GAP = 0.3  # above the 5.8% measured on 1,500 problems: hypothesis hunts the worst
ROUNDING_MISS_RATE = 0.02  # the share of a sweep's budgets off the optimum (0.07% measured)


def _loss(ranks, sens):
    return sum(s / r if r > 0 else 2.0 * s for r, s in zip(ranks, sens))


@st.composite
def small_problems(draw):
    n = draw(st.integers(1, 4))
    dims = {f"l{i}": (draw(st.integers(1, 7)), draw(st.integers(1, 7))) for i in range(n)}
    sens = {nm: draw(st.one_of(st.just(0.0), st.floats(1e-3, 30.0))) for nm in dims}
    sens[draw(st.sampled_from(sorted(dims)))] = draw(st.floats(1e-3, 30.0))
    min_rank = draw(st.integers(0, 1))
    max_rank = draw(st.one_of(st.none(), st.integers(1, 5)))
    return dims, sens, min_rank, max_rank


def _sweep(dims, sens, min_rank, max_rank):
    """(budget, loss, brute-force optimum) for every budget from the cheapest to past the bounds."""
    costs = [d + k for d, k in dims.values()]
    upper = [min(d, k) if max_rank is None else min(d, k, max_rank) for d, k in dims.values()]
    s = list(sens.values())
    rank_vectors = list(itertools.product(*(range(min_rank, u + 1) for u in upper)))
    spends = [sum(c * r for c, r in zip(costs, v)) for v in rank_vectors]
    losses = [_loss(v, s) for v in rank_vectors]
    out = []
    for budget in range(max(min_rank * sum(costs), min(costs)), sum(c * u for c, u in zip(costs, upper)) + 3):
        ranks = allocate(dims, sens, budget, method="closed_form", min_rank=min_rank, max_rank=max_rank)
        assert sum(c * ranks[nm] for c, nm in zip(costs, dims)) <= budget
        best = min(loss for loss, spend in zip(losses, spends) if spend <= budget)
        out.append((budget, _loss(list(ranks.values()), s), best))
    return out


@SWEEP
@given(small_problems())
def test_loss_never_rises_with_the_budget_and_is_optimal(prob):
    dims, sens, min_rank, max_rank = prob
    costs = np.array([d + k for d, k in dims.values()])
    upper = np.array([min(d, k) if max_rank is None else min(d, k, max_rank) for d, k in dims.values()])
    assert closed_form.exact_cells(costs, np.full(len(costs), min_rank), upper) <= closed_form.EXACT_CELLS
    sweep = _sweep(dims, sens, min_rank, max_rank)
    for (b0, loss0, _), (b1, loss1, best1) in zip(sweep, sweep[1:]):
        assert loss1 <= loss0 * (1 + 1e-12), (b0, loss0, b1, loss1)
        assert loss1 <= best1 * (1 + 1e-12), (b1, loss1, best1)


@SWEEP
@given(small_problems())
def test_rounding_is_within_the_documented_gap(prob):
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(closed_form, "EXACT_CELLS", -1)
        sweep = _sweep(*prob)
    gaps = np.array([loss / best - 1.0 for _, loss, best in sweep])
    assert gaps.max() <= ROUNDING_WORST_GAP, sweep
    assert np.mean(gaps > 1e-9) <= max(ROUNDING_MISS_RATE, 1.0 / len(gaps)), sweep


def test_budget_29_then_30_from_the_report(monkeypatch):
    # held above the law's floors, budget 30 gave {1, 1, 1} (loss 15.19, 26 spent) after
    # {2, 0, 1} (loss 14.69) at budget 29, which still fits
    dims = {"l0": (6, 5), "l1": (5, 3), "l2": (6, 1)}
    sens = {"l0": 7.2176685185388765, "l1": 3.1093163368339667, "l2": 4.863495234729573}
    for cells in (closed_form.EXACT_CELLS, -1):  # exact, then the rounding
        monkeypatch.setattr(closed_form, "EXACT_CELLS", cells)
        assert allocate(dims, sens, 29) == {"l0": 2, "l1": 0, "l2": 1}
        assert allocate(dims, sens, 30) == {"l0": 2, "l1": 0, "l2": 1}
