"""Finite real arguments, with an int beyond the float range (``10**400``) refused as not finite
instead of raising Python's OverflowError, which names no argument."""

from __future__ import annotations

import math
import numbers

__all__ = ["is_finite_number", "shown_number"]


def is_finite_number(value) -> bool:
    """Whether ``value`` is a real number (a bool is not) with a finite float value; an int too
    large for a float is not."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def shown_number(value) -> str:
    """``repr(value)`` for an error message; an int too long to read is given by its digit count."""
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:8]}... (a number of {len(text.lstrip('-'))} digits)"
