"""Layers whose weight is tied to another module's, each measured as its own adapter sees it.

``configure_model`` gives every targeted layer an adapter of its own, also when two of them hold
one Parameter (``b.weight = a.weight``, a head tied to the embedding). What an adapter on layer a
can change is the weight as *a* uses it, so a's sensitivity is the derivative with respect to
that use, every other use held fixed, as for any two layers; the cross terms between the uses
are cross-layer terms. While an estimator runs, each such layer holds a Parameter of its own that
views the same storage (no copy, nothing written), and the shared one is put back after, also
when the estimator raises. A module called several times (one holder) keeps its one weight: its
one adapter sees every call.
"""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager
from typing import Iterator, Sequence

from torch import nn

from .targets import Target, weight_holder

__all__ = ["untied"]


@contextmanager
def untied(model: nn.Module, targets: Sequence[Target]) -> Iterator[list[Target]]:
    """``targets`` with a weight of their own for every target whose weight another module of
    ``model`` (or another target) holds too; the model's Parameters are restored on exit."""
    holders = Counter(id(p) for m in model.modules() for p in m._parameters.values() if p is not None)
    shared = [t for t in targets if holders[id(t.weight)] > 1]
    for t in shared:
        if weight_holder(t.module)._parameters.get("weight") is not t.weight:
            raise ValueError(f"layer {t.name!r} shares its weight with another module but does not hold it as "
                             "its own `weight` Parameter (a parametrization?), so it cannot be measured alone")
    swaps: list[tuple[nn.Module, nn.Parameter | None]] = []
    try:
        out = []
        for t in targets:
            if holders[id(t.weight)] > 1:
                holder = weight_holder(t.module)
                own = nn.Parameter(t.weight.detach(), requires_grad=t.weight.requires_grad)
                swaps.append((holder, holder._parameters["weight"]))  # t.weight, as checked above
                holder._parameters["weight"] = own
                t = Target(t.name, t.module, own)
            out.append(t)
        yield out
    finally:
        for holder, weight in reversed(swaps):
            holder._parameters["weight"] = weight
