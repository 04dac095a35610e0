"""Input checking shared by every allocation method.

Everything the solvers need is turned into one :class:`Problem` of plain arrays (costs, lower and
upper rank bounds, an integer budget), so the solvers never see user input. Every rejection is a
``ValueError`` that names the offending layer and value: a bad allocation input is usually a typo
in a module name or a NaN from a sensitivity estimator, and the message should point at it.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch

from lorambo.nn.finite_numbers import is_finite_number, is_int, shown_number
from lorambo.sensitivity.estimate import Estimate

# Relative slack for "non-increasing" checks on float curves: singular values and tail energies
# computed in float64 can wiggle by a few ulps; 1e-9 of the curve's scale is far above that noise
# and far below any real increase.
CURVE_RTOL = 1e-9


@dataclass(frozen=True)
class Problem:
    """A validated allocation problem; arrays are indexed like ``names`` (the order of ``dims``)."""

    names: tuple
    costs: np.ndarray  # int64, c_i = d_i + k_i: parameters added by one rank of layer i
    lower: np.ndarray  # int64, min_rank for every layer
    upper: np.ndarray  # int64, min(max_rank, capacity_i, d_i, k_i)
    budget: int  # floor of the user's budget (costs are integers)
    sens: np.ndarray | None  # float64 sensitivities, None when the method needs none


def check_rank_bounds(min_rank: Any, max_rank: Any) -> None:
    """ValueError unless ``min_rank`` is an int >= 0 and ``max_rank`` an int >= min_rank or None."""
    if not is_int(min_rank) or min_rank < 0:
        raise ValueError(f"min_rank={min_rank!r} must be an int >= 0")
    if max_rank is not None and (not is_int(max_rank) or max_rank < 0):
        raise ValueError(f"max_rank={max_rank!r} must be an int >= 0 or None")
    if max_rank is not None and min_rank > max_rank:
        raise ValueError(f"min_rank={min_rank} > max_rank={max_rank}")


def _check_keys(what: str, given: Mapping, names: tuple) -> None:
    if not isinstance(given, Mapping):
        raise ValueError(f"{what} must be a dict {{layer name: value}}, got {type(given).__name__}")
    known = set(names)  # once: a set per key would make this quadratic in the layer count
    unknown = [k for k in given if k not in known]
    if unknown:
        raise ValueError(f"{what} given for unknown layer(s) {unknown!r} (not in dims)")
    missing = [n for n in names if n not in given]
    if missing:
        raise ValueError(f"{what} missing for layer(s) {missing!r}")


def _real(what: str, name: Any, value: Any) -> float:
    if isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{what} for layer {name!r} is {value!r}: expected a real number")
    if isinstance(value, Estimate):  # hessian_trace's, hessian_opnorm's or FisherProxy's output as it came
        raise ValueError(f"{what} for layer {name!r} is {value!r}: expected a real number; pass the "
                         "estimates' values, {name: e.value for name, e in estimates.items()}")
    try:
        return float(value)
    except OverflowError:  # an int beyond the float range, 10**400
        raise ValueError(f"{what} for layer {name!r} is {shown_number(value)}: expected a finite real number "
                         "(it is too large for a float)") from None
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{what} for layer {name!r} is {value!r}: expected a real number") from None


def _budget(budget: Any) -> int:
    if isinstance(budget, (bool, np.bool_)) or not isinstance(budget, numbers.Real):
        raise ValueError(f"budget={budget!r} must be a real number of parameters")
    if not is_finite_number(budget) or float(budget) < 0:
        raise ValueError(f"budget={shown_number(budget)} must be finite and >= 0")
    return int(budget) if is_int(budget) else math.floor(float(budget))


def check_budget_buys_minimum(what: str, shown: Any, value: float, costs: Mapping[Any, int],
                              min_rank: int) -> None:
    """ValueError unless ``value`` (the budget given as ``what=shown``) pays for one rank in the
    cheapest layer and ``min_rank`` ranks in every layer; ``costs``: ``{layer name: d + k}``."""
    cheapest = min(costs, key=costs.__getitem__)
    if value < costs[cheapest]:
        raise ValueError(f"{what}={shown!r} is below the cost of one rank in the cheapest layer "
                         f"{cheapest!r} (d + k = {costs[cheapest]})")
    floor_cost = min_rank * sum(costs.values())
    if value < floor_cost:
        raise ValueError(f"{what}={shown!r} is below the cost of min_rank={min_rank} in every "
                         f"layer (sum of min_rank * (d + k) = {floor_cost})")


def validate_problem(dims, sensitivities, budget, min_rank, max_rank, capacities,
                     need_sensitivities: bool) -> Problem:
    """Check everything except the method-specific curves; return a :class:`Problem`."""
    if not isinstance(dims, Mapping):
        raise ValueError(f"dims must be a dict {{layer name: (d, k)}}, got {type(dims).__name__}")
    if len(dims) == 0:
        raise ValueError("dims is empty: there is no layer to allocate ranks to")
    names = tuple(dims)
    costs, full = [], []
    for name, dk in dims.items():
        ok = isinstance(dk, (tuple, list, np.ndarray)) and len(dk) == 2 and all(is_int(v) for v in dk)
        if not ok or min(dk) <= 0:
            raise ValueError(f"dims[{name!r}] = {dk!r}: expected (d, k), two positive ints "
                             "(out_features, in_features)")
        costs.append(int(dk[0]) + int(dk[1]))
        full.append(min(int(dk[0]), int(dk[1])))

    check_rank_bounds(min_rank, max_rank)
    caps = {} if capacities is None else capacities
    if capacities is not None:
        if not isinstance(capacities, Mapping):
            raise ValueError("capacities must be a dict {layer name: int}")
        known = set(names)
        unknown = [k for k in capacities if k not in known]
        if unknown:
            raise ValueError(f"capacities given for unknown layer(s) {unknown!r} (not in dims)")
    upper = []
    for name, m in zip(names, full):
        u = m if max_rank is None else min(m, int(max_rank))
        if name in caps:
            cap = caps[name]
            if not is_int(cap) or cap < 0:
                raise ValueError(f"capacities[{name!r}] = {cap!r} must be an int >= 0")
            if cap < min_rank:
                raise ValueError(f"capacities[{name!r}] = {cap} is a capacity too small for the "
                                 f"requested rank min_rank={min_rank}")
            u = min(u, int(cap))
        if m < min_rank:
            raise ValueError(f"min_rank={min_rank} exceeds the full rank min(d, k) = {m} of layer "
                             f"{name!r}")
        upper.append(u)

    sens = None
    if sensitivities is None:
        if need_sensitivities:
            raise ValueError("this method needs sensitivities {layer name: float >= 0}")
    else:
        _check_keys("sensitivities", sensitivities, names)
        sens = np.empty(len(names))
        for i, name in enumerate(names):
            v = _real("sensitivity", name, sensitivities[name])
            if not math.isfinite(v) or v < 0:
                raise ValueError(f"sensitivity for layer {name!r} is {v!r}: sensitivities must be "
                                 "finite and >= 0")
            sens[i] = v

    b = _budget(budget)
    check_budget_buys_minimum("budget", budget, b, dict(zip(names, costs)), min_rank)
    return Problem(names, np.asarray(costs, dtype=np.int64),
                   np.full(len(names), int(min_rank), dtype=np.int64),
                   np.asarray(upper, dtype=np.int64), b, sens)


def _non_increasing(arr: np.ndarray, what: str, name: Any, explain: str) -> None:
    if arr.size < 2:
        return
    tol = CURVE_RTOL * float(np.max(np.abs(arr)))
    bad = np.nonzero(np.diff(arr) > tol)[0]
    if bad.size:
        j = int(bad[0])
        raise ValueError(f"{what}[{name!r}] must be non-increasing ({explain}): entry {j + 1} = "
                         f"{float(arr[j + 1])!r} > entry {j} = {float(arr[j])!r}")


def _check_curve(arr: np.ndarray, what: str, name: Any, kind: str) -> None:
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{what}[{name!r}] contains NaN or inf: {arr!r}")
    if kind == "spectrum":
        if np.any(arr < 0):
            raise ValueError(f"{what}[{name!r}] has a negative singular value: {arr!r}")
        _non_increasing(arr, what, name, "singular values sorted sigma_1 >= sigma_2 >= ...")
    elif kind == "benefit":
        _non_increasing(arr, what, name, "benefits[j] is the gain of rank j -> j+1 and must "
                                         "show diminishing returns for the greedy to be sound")
    else:
        if arr.size == 0:
            raise ValueError(f"{what}[{name!r}] is empty: it needs E[0] (the rank-0 energy)")
        _non_increasing(arr, what, name, "a better approximation never has more error")
        _non_increasing(-np.diff(arr), what + " decrements", name,
                        "the gain E[r] - E[r+1] must shrink as r grows")


def _increases(rows: np.ndarray) -> np.ndarray:
    """Row-wise ``_non_increasing`` would raise (the same arithmetic, on a [n, L] stack)."""
    if rows.shape[1] < 2:
        return np.zeros(rows.shape[0], dtype=bool)
    tol = CURVE_RTOL * np.max(np.abs(rows), axis=1, keepdims=True)
    return np.any(np.diff(rows, axis=1) > tol, axis=1)


def _suspect_rows(rows: np.ndarray, kind: str) -> np.ndarray:
    """Rows of equal-length curves that ``_check_curve`` may reject; the others pass it."""
    with np.errstate(invalid="ignore", over="ignore"):
        bad = ~np.all(np.isfinite(rows), axis=1)
        if kind == "spectrum":
            bad |= np.any(rows < 0, axis=1) | _increases(rows)
        elif kind == "benefit":
            bad |= _increases(rows)
        elif rows.shape[1] == 0:
            bad[:] = True
        else:
            bad |= _increases(rows) | _increases(-np.diff(rows, axis=1))
    return bad


def validate_curves(what: str, method: str, curves, names: tuple, kind: str) -> list[np.ndarray]:
    """Check per-layer 1-D curves and return them as float64 arrays in ``names`` order.

    kind: "spectrum" (singular values: >= 0, non-increasing), "benefit" (marginal gains:
    non-increasing, i.e. concave cumulative benefit) or "tail" (tail energies: non-increasing
    with non-increasing decrements, i.e. convex, so that the gains are diminishing).
    Curves of equal length are checked together as one array (thousands of layers), and only
    a curve that fails is checked again on its own, for the message.
    """
    if curves is None:
        raise ValueError(f"method={method!r} needs {what}={{layer name: 1-D array}}")
    _check_keys(what, curves, names)
    out = []
    for name in names:
        curve = curves[name]
        if isinstance(curve, torch.Tensor) and curve.device.type != "meta":
            # curves on the GPU or in bfloat16: numpy reads neither as they are
            curve = curve.detach().to("cpu", torch.float64)
        try:
            arr = np.asarray(curve, dtype=np.float64)
        except (TypeError, ValueError, RuntimeError) as e:
            raise ValueError(f"{what}[{name!r}] is not a 1-D array of numbers: {e}") from None
        if arr.ndim != 1:
            raise ValueError(f"{what}[{name!r}] must be 1-D, got shape {arr.shape}")
        out.append(arr)
    by_length: dict[int, list[int]] = {}
    for i, arr in enumerate(out):
        by_length.setdefault(arr.size, []).append(i)
    suspects = []
    for size, index in by_length.items():
        rows = np.stack([out[i] for i in index]) if index else np.empty((0, size))
        suspects.extend(index[j] for j in np.nonzero(_suspect_rows(rows, kind))[0])
    for i in sorted(suspects):  # in names order, so the first bad layer is the one reported
        _check_curve(out[i], what, names[i], kind)
    return out
