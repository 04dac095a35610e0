"""``allocate``: validate, dispatch to one method, check the budget before returning."""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from .closed_form import closed_form_ranks
from .exact import exact_allocate
from .greedy import curve_gain, curve_upper, data_weighted_curves, frobenius_curves, greedy_allocate
from .uniform import uniform_ranks
from .validate import validate_curves, validate_problem

METHODS = ("uniform", "closed_form", "frobenius_greedy", "knapsack", "data_weighted")
GAIN_METHODS = ("frobenius_greedy", "knapsack", "data_weighted")  # the ones exact=True applies to
SENSITIVITY_READERS = ("closed_form", "frobenius_greedy", "data_weighted")  # the ones that read sensitivities
# each keyword-only curve and the one method that reads it
CURVE_READERS = {"spectra": "frobenius_greedy", "benefits": "knapsack", "tail_energies": "data_weighted"}


def allocate(dims: Mapping[Any, tuple[int, int]], sensitivities: Mapping[Any, float] | None,
             budget: float, method: str = "closed_form", min_rank: int = 0,
             max_rank: int | None = None, capacities: Mapping[Any, int] | None = None, *,
             spectra: Mapping[Any, Any] | None = None, benefits: Mapping[Any, Any] | None = None,
             tail_energies: Mapping[Any, Any] | None = None, exact: bool = False) -> dict[Any, int]:
    """Per-layer LoRA ranks under a global parameter budget.

    Args:
        dims: ``{name: (d, k)}`` (out_features, in_features); one rank of layer i costs
            ``c_i = d_i + k_i`` parameters.
        sensitivities: ``{name: s_i}``, finite and >= 0, same keys as ``dims``. May be ``None``
            for ``uniform`` and ``knapsack``, which do not use it (it is validated if given).
        budget: parameter budget P; ``sum_i r_i c_i <= P`` always holds for the result.
        method: ``"closed_form"`` (square-root law ``r_i ~ sqrt(s_i / c_i)``, see
            ``closed_form.py``), ``"uniform"`` (one water level, see ``uniform.py``), or a
            gain-based greedy (``greedy.py``): ``"frobenius_greedy"`` (gains
            ``s_i * sigma_{r+1}^2``), ``"knapsack"`` (given gains), ``"data_weighted"``
            (gains ``s_i * (E_i[r] - E_i[r+1])``).
        min_rank, max_rank: bounds for every layer; each rank also stays <= ``capacities[name]``
            (if given) and <= ``min(d_i, k_i)``.
        spectra: ``frobenius_greedy`` only: ``{name: singular values of W_i, non-increasing}``.
            Each of ``spectra``, ``benefits`` and ``tail_energies`` given to another method is a
            ``ValueError`` (that method would ignore it).
        benefits: ``knapsack`` only: ``{name: g}`` with ``g[r]`` the gain of going from rank r to
            r + 1 (absolute rank index: entries below min_rank are never used), non-increasing.
        tail_energies: ``data_weighted`` only: ``{name: E}`` with ``E[r]`` the data-weighted error
            ``Tr((W - W_r)^T G (W - W_r))`` of the best rank-r approximation, r = 0..R.
        exact: gain-based methods only: solve the integer program exactly by dynamic programming
            over the budget (small instances; raises ``ValueError`` if too large).

    Ranks past the end of a gain curve are never given. Returns ``{name: int}`` in ``dims`` order.
    Raises ``ValueError`` on bad input, naming the layer and the value.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid methods: {', '.join(METHODS)}")
    if not isinstance(exact, (bool, np.bool_)):
        raise ValueError(f"exact={exact!r} must be True or False")
    if exact and method not in GAIN_METHODS:
        raise ValueError(f"exact=True applies only to {', '.join(GAIN_METHODS)}, not {method!r}")
    check_curves_read("allocate", method, {"spectra": spectra, "benefits": benefits, "tail_energies": tail_energies})
    p = validate_problem(dims, sensitivities, budget, min_rank, max_rank, capacities,
                         need_sensitivities=method in SENSITIVITY_READERS)
    if method == "uniform":
        ranks = uniform_ranks(p.costs, p.lower, p.upper, p.budget)
    elif method == "closed_form":
        ranks = closed_form_ranks(p.names, p.costs, p.sens, p.lower, p.upper, p.budget)
    else:
        if method == "knapsack":
            curves, scale = validate_curves("benefits", method, benefits, p.names, "benefit"), None
        elif method == "frobenius_greedy":
            curves = frobenius_curves(validate_curves("spectra", method, spectra, p.names, "spectrum"))
            scale = p.sens
        else:
            tails = validate_curves("tail_energies", method, tail_energies, p.names, "tail")
            curves, scale = data_weighted_curves(tails), p.sens
        solve = exact_allocate if exact else greedy_allocate
        ranks = solve(p.costs, p.lower, curve_upper(curves, p.lower, p.upper), p.budget,
                      curve_gain(curves, scale))
    return _checked(p, ranks)


def check_curves_read(caller: str, method: str, curves: Mapping[str, Any], setting: str = "method") -> None:
    """ValueError for a curve (``spectra``, ``benefits``, ``tail_energies``) given to a method
    that does not read it: the caller meant another method, and the ranks, which pass every
    budget check, would not show it. ``setting``: the caller's name for the method argument."""
    for what, given in curves.items():
        reader = CURVE_READERS.get(what)
        if reader is not None and given is not None and reader != method:
            raise ValueError(f"{caller}: {what}= is read only by {setting}={reader!r}, and {setting}={method!r} "
                             f"would ignore it: pass it with {setting}={reader!r} or leave it out")


def _checked(p, ranks: np.ndarray) -> dict[Any, int]:
    """The budget and bounds are promises to the caller: verify them (not ``assert``: kept -O)."""
    out = {name: int(r) for name, r in zip(p.names, ranks)}
    spent = sum(int(c) * out[n] for n, c in zip(p.names, p.costs))
    if spent > p.budget:
        raise AssertionError(f"internal error: allocation spends {spent} > budget {p.budget}")
    for name, lo, up in zip(p.names, p.lower, p.upper):
        if not lo <= out[name] <= up:
            raise AssertionError(f"internal error: rank {out[name]} of {name!r} outside [{lo}, {up}]")
    return out
