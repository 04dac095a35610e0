"""Optimizer state that a fresh torch optimizer does not start at zero.

A slot that becomes active gets the state a fresh optimizer would give it. That is zero for
almost every per-element state tensor (Adam's moments, SGD's momentum, Adafactor's factors, ...),
but two torch optimizers start elsewhere:

- ``torch.optim.Rprop``: ``step_size`` starts at the learning rate. At zero a slot's step size
  climbs back from ``step_sizes[0]`` by ``etas[1]`` per step: about 50 steps without training
  at ``lr=1e-2``.
- ``torch.optim.Adagrad``: ``sum`` starts at ``initial_accumulator_value``.

When every active slot of a pool is new, its per-parameter scalars restart too (with ``step``):
NAdam's ``mu_product`` (its bias correction; stale, the first updates were ~45% off a fresh
NAdam's) and ASGD's ``eta`` and ``mu``. Otherwise such a shared step sets a new slot's updates
for Adagrad with ``lr_decay`` and ASGD too (:func:`step_scales_updates`; warned about, like Adam).

SGD with ``dampening > 0``, whose fresh first momentum is the update itself, needs the step's
gradient: :mod:`lorambo.nn.fresh_momentum`.
"""

from __future__ import annotations

import torch

from lorambo.nn.optimizer_kind import group_of, optimizer_kind

__all__ = ["fresh_state_values", "fresh_scalar_values", "step_scales_updates"]


def fresh_state_values(optimizer, param) -> dict[str, float]:
    """``{state key: value}`` a fresh ``optimizer`` starts ``param``'s per-element state at, for
    the keys whose start is not zero (empty for every other optimizer)."""
    kind = optimizer_kind(optimizer)
    if not issubclass(kind, (torch.optim.Rprop, torch.optim.Adagrad)):
        return {}
    group = group_of(optimizer, param)
    if group is None:
        return {}
    if issubclass(kind, torch.optim.Rprop):
        return {"step_size": float(group["lr"])}
    return {"sum": float(group["initial_accumulator_value"])}


def fresh_scalar_values(optimizer, param) -> dict[str, float]:
    """``{state key: value}`` of the per-parameter scalars (besides ``step``) that a fresh
    ``optimizer`` starts ``param`` at (empty for every other optimizer)."""
    kind = optimizer_kind(optimizer)
    if issubclass(kind, torch.optim.NAdam):
        return {"mu_product": 1.0}
    if issubclass(kind, torch.optim.ASGD):
        group = group_of(optimizer, param)
        return {} if group is None else {"eta": float(group["lr"]), "mu": 1.0}
    return {}


def step_scales_updates(optimizer, param) -> bool:
    """Whether ``optimizer`` (one without Adam-style moments) sets ``param``'s updates from its
    per-parameter ``step``, so that a slot activated at step t is not updated as under a fresh
    optimizer: Adagrad with ``lr_decay`` (``lr / (1 + (step - 1) * lr_decay)``) and ASGD (its
    ``eta`` and ``mu`` follow the step)."""
    kind = optimizer_kind(optimizer)
    if issubclass(kind, torch.optim.ASGD):
        return True
    if issubclass(kind, torch.optim.Adagrad):
        group = group_of(optimizer, param)
        return bool(group is not None and group.get("lr_decay"))
    return False
