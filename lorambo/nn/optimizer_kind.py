"""What an optimizer a slot edit is given is, and which of its groups holds a parameter.

``lorambo.integrations.fsdp``'s gathered view stands in for the real optimizer during a slot
edit and names it in ``optimizer_type``; the per-optimizer rules (fresh state values, SGD's
momentum start, LBFGS's restart) go by that type.
"""

from __future__ import annotations

__all__ = ["optimizer_kind", "group_of"]


def optimizer_kind(optimizer) -> type:
    """The type of the optimizer ``optimizer`` is or stands in for."""
    return getattr(optimizer, "optimizer_type", type(optimizer))


def group_of(optimizer, param) -> dict | None:
    """The param group of ``optimizer`` that holds ``param`` (by identity), or None."""
    for group in getattr(optimizer, "param_groups", ()):
        if any(p is param for p in group["params"]):
            return group
    return None
