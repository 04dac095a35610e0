"""Number arguments: integers (a bool is not one), and finite reals, with an int beyond the float
range (``10**400``) refused as not finite instead of raising Python's OverflowError, which names
no argument."""

from __future__ import annotations

import math
import numbers

__all__ = ["is_int", "is_finite_number", "float_value", "shown_number"]


def is_int(value) -> bool:
    """Whether ``value`` is an integer (numpy's included); a bool is not."""
    if type(value) is int:  # the common case, without the slow abstract-class check
        return True
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_finite_number(value) -> bool:
    """Whether ``value`` is a real number (a bool is not) with a finite float value; an int too
    large for a float is not."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def float_value(value) -> float:
    """``float(value)``, an int beyond the float range given as the infinity of its sign, so that
    a NaN or finiteness check on it answers instead of raising OverflowError."""
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def shown_number(value) -> str:
    """``repr(value)`` for an error message; an int too long to read is given by its digit count."""
    text = repr(value)
    if len(text) <= 40 or not isinstance(value, numbers.Integral):
        return text
    return f"{text[:8]}... (a number of {len(text.lstrip('-'))} digits)"
