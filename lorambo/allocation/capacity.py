"""Pool sizes (capacities) for allocated ranks, and the device memory those pools take.

A layer's pool holds ``capacity`` rank slots, ``capacity * (d + k)`` parameters. A capacity fixed
by the user or by an existing LoRA layer is kept (and checked); any other leaves room to grow by
the layer's own rule, :func:`lorambo.nn.default_capacity` (``growth_factor`` times the rank,
rounded up to a power of two, at least 8, at most min(d, k)), further capped by ``max_rank`` and
by what the whole budget could ever buy in that layer (``budget // (d + k)``).
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping

import torch

from lorambo.nn.lora_linear import default_capacity

__all__ = ["fixed_capacities", "growth_capacity", "plan_capacities", "pool_memory", "describe_pool_memory"]


def fixed_capacities(existing: Mapping[str, int], capacity, dims: Mapping[str, tuple[int, int]],
                     min_rank: int = 0) -> dict[str, int]:
    """``{name: capacity}`` that planning must keep: those of ``existing`` LoRA layers (they cannot
    change) plus the user's ``capacity`` (an int for every layer of ``dims``, or a dict) elsewhere.
    Each must hold ``min_rank`` and fit in min(d, k)."""
    fixed = {n: int(c) for n, c in existing.items() if n in dims}
    if capacity is not None:
        caps = capacity if isinstance(capacity, Mapping) else dict.fromkeys(dims, capacity)
        unknown = [n for n in caps if n not in dims]
        if unknown:
            raise ValueError(f"capacity given for unknown layer(s) {unknown!r}")
        for n, c in caps.items():
            if isinstance(c, bool) or not isinstance(c, numbers.Integral) or c < 1:
                raise ValueError(f"capacity of layer {n!r} is {c!r}: must be an int >= 1")
            if n not in fixed:
                fixed[n] = int(c)
    for n, c in fixed.items():
        if c < min_rank:
            raise ValueError(f"capacity {c} of layer {n!r} is too small for the requested rank "
                             f"min_rank={min_rank}")
        if c > min(dims[n]):  # found here, not by plan_capacities after the measuring
            raise ValueError(f"capacity {c} of layer {n!r} exceeds min(d, k) = {min(dims[n])}")
    return fixed


def growth_capacity(rank: int, dims: tuple[int, int], growth_factor: float = 2.0,
                    max_rank: int | None = None, budget: int | None = None) -> int:
    """Capacity of a layer of ``dims`` = (d, k) at ``rank``: :func:`default_capacity`, no more than
    ``max_rank`` or ``budget // (d + k)``, never below the rank itself (nor 1)."""
    d, k = dims
    cap = default_capacity(rank, k, d, growth_factor)
    if max_rank is not None:
        cap = min(cap, max_rank)
    if budget is not None:
        cap = min(cap, budget // (d + k))  # more could never be paid for
    return int(max(cap, rank, 1))


def plan_capacities(ranks: Mapping[str, int], dims: Mapping[str, tuple[int, int]],
                    fixed: Mapping[str, int] | None = None, growth_factor: float = 2.0,
                    max_rank: int | None = None, budget: int | None = None) -> dict[str, int]:
    """``{name: capacity}`` for every layer of ``dims``: ``fixed[name]`` where given (checked to
    hold the rank and fit in min(d, k)), else :func:`growth_capacity`."""
    fixed = fixed or {}
    missing = [n for n in dims if n not in ranks]
    if missing:
        raise ValueError(f"plan_capacities: no rank given for layer(s) {missing[:5]!r}")
    out = {}
    for n, dk in dims.items():
        r = int(ranks[n])
        if n in fixed:
            cap, limit = int(fixed[n]), min(dk)
            if cap < r:
                raise ValueError(f"capacity {cap} of layer {n!r} is too small for the requested rank {r}")
            if cap > limit:
                raise ValueError(f"capacity {cap} of layer {n!r} exceeds min(d, k) = {limit}")
            out[n] = cap
        else:
            out[n] = growth_capacity(r, dk, growth_factor, max_rank, budget)
    return out


def pool_memory(capacities: Mapping[str, int], dims: Mapping[str, tuple[int, int]],
                dtypes: Mapping[str, torch.dtype], ranks: Mapping[str, int] | None = None) -> dict:
    """Bytes of every pool (``capacity * (d + k)`` elements of the layer's dtype) and the
    parameter counts: ``per_layer_bytes``, ``total_bytes``, ``active_params`` (at ``ranks``,
    0 without them) and ``pool_params``."""
    costs = {n: d + k for n, (d, k) in dims.items()}
    ranks = ranks or {}
    per = {n: int(capacities[n]) * costs[n] * torch.empty((), dtype=dtypes[n]).element_size() for n in dims}
    return {"per_layer_bytes": per, "total_bytes": sum(per.values()),
            "active_params": sum(costs[n] * ranks.get(n, 0) for n in dims),
            "pool_params": sum(costs[n] * int(capacities[n]) for n in dims)}


def describe_pool_memory(report: Mapping, budget: int) -> str:
    """One line for the log: pool parameters, device memory, active parameters and the budget."""
    return (f"LoRA pools: {len(report['per_layer_bytes'])} layers, {report['pool_params']:,} "
            f"slots-parameters, {report['total_bytes'] / 2**20:.3f} MiB of device memory "
            f"({report['active_params']:,} parameters active, budget {budget:,})")
