"""peft's per-layer pattern semantics (``rank_pattern`` / ``alpha_pattern`` keys).

A key matches a module name when the name ends with it after a dot, the key read as a regular
expression (peft: ``re.match(rf"(.*\\.)?({key})$", name)``); the first matching key in insertion
order wins. Kept identical so a config means the same thing to lorambo and to peft.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from lorambo.nn.finite_numbers import is_finite_number, shown_number

__all__ = ["pattern_key", "pattern_value"]


def pattern_key(keys: Iterable[str], name: str) -> str | None:
    """The first key of ``keys`` that matches module ``name``, or None."""
    for key in keys:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return None


def pattern_value(pattern: Mapping[str, float] | None, name: str, default):
    """``pattern[key]`` for the first key matching ``name``, else ``default``."""
    if not pattern:
        return default
    key = pattern_key(pattern.keys(), name)
    return default if key is None else pattern[key]


def check_alpha_pattern(alpha_pattern: Mapping[str, float] | None, names: Iterable[str]) -> None:
    """Every key must match at least one of ``names`` and every value be a finite number > 0."""
    if not alpha_pattern:
        return
    if not isinstance(alpha_pattern, Mapping):
        raise TypeError(f"alpha_pattern must be a {{pattern: alpha}} dict, got {alpha_pattern!r}")
    names = list(names)
    for key, value in alpha_pattern.items():
        try:
            re.compile(key)
        except (re.error, TypeError) as err:
            raise ValueError(f"alpha_pattern key {key!r} is not a valid pattern: {err}") from err
        if not (is_finite_number(value) and value > 0):
            raise ValueError(f"alpha_pattern[{key!r}] = {shown_number(value)} must be a finite number > 0")
        if not any(pattern_key([key], n) for n in names):
            raise ValueError(f"alpha_pattern key {key!r} matches none of the adapted modules "
                             f"(e.g. {names[:3]})")
