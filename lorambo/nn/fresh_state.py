"""Per-element optimizer state that a fresh torch optimizer does not start at zero.

A slot that becomes active gets the state a fresh optimizer would give it. That is zero for
almost every state tensor (Adam's moments, SGD's momentum, Adafactor's factors, ...), but two
torch optimizers start elsewhere:

- ``torch.optim.Rprop``: ``step_size`` starts at the learning rate. At zero a slot's step size
  climbs back from ``step_sizes[0]`` by ``etas[1]`` per step: about 50 steps without training
  at ``lr=1e-2``.
- ``torch.optim.Adagrad``: ``sum`` starts at ``initial_accumulator_value``.
"""

from __future__ import annotations

import torch

__all__ = ["fresh_state_values"]


def _group_of(optimizer, param) -> dict | None:
    for group in getattr(optimizer, "param_groups", ()):
        if any(p is param for p in group["params"]):
            return group
    return None


def fresh_state_values(optimizer, param) -> dict[str, float]:
    """``{state key: value}`` a fresh ``optimizer`` starts ``param``'s per-element state at, for
    the keys whose start is not zero (empty for every other optimizer). ``optimizer`` may stand
    in for another one (``lorambo.integrations.fsdp``'s gathered view) by naming its
    ``optimizer_type``."""
    kind = getattr(optimizer, "optimizer_type", type(optimizer))
    if not (issubclass(kind, (torch.optim.Rprop, torch.optim.Adagrad))):
        return {}
    group = _group_of(optimizer, param)
    if group is None:
        return {}
    if issubclass(kind, torch.optim.Rprop):
        return {"step_size": float(group["lr"])}
    return {"sum": float(group["initial_accumulator_value"])}
