"""Finite real arguments, with an int beyond the float range (``10**400``) refused as not finite
instead of raising Python's OverflowError, which names no argument."""

from __future__ import annotations

import math
import numbers

__all__ = ["is_finite_number", "shown_number"]


def is_finite_number(value: numbers.Real) -> bool:
    """Whether ``value`` is a finite float; an int too large for one is not."""
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def shown_number(value) -> str:
    """``repr(value)`` for an error message; an int too long to read is given by its digit count."""
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:8]}... (a number of {len(text.lstrip('-'))} digits)"
