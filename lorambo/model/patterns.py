"""peft's per-layer pattern semantics (``rank_pattern`` / ``alpha_pattern`` keys).

A key matches a module name when the name ends with it after a dot, the key read as a regular
expression (peft: ``re.match(rf"(.*\\.)?({key})$", name)``); the first matching key in insertion
order wins. Kept identical so a config means the same thing to lorambo and to peft.

An exported adapter has one key per layer (``export_peft``), so a model of n layers looks up n
names among n keys: :class:`PatternKeys` finds the keys made of letters, digits, ``_`` and ``.``
(every key ``export_peft`` writes) by dictionary lookups of the name's suffixes, and compiles the
other keys once, instead of matching every key against every name (n^2 regex matches, each a
recompile once n passes the 512 patterns ``re`` caches: 4 s to import 600 layers).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from lorambo.nn.finite_numbers import is_finite_number, shown_number

__all__ = ["PatternKeys", "check_alpha_pattern", "pattern_lookup"]

_PLAIN = re.compile(r"[A-Za-z0-9_.]+")  # a key of literal characters and "." (any one character)


class PatternKeys:
    """The keys of a pattern, ready to find the first that matches each of many names."""

    def __init__(self, keys: Iterable[str]) -> None:
        self.keys = list(keys)
        # plain keys by length, then by the positions of their ".": a suffix of the name of that
        # length, those positions replaced by ".", matches a key of the group iff it equals it
        self._plain: dict[int, dict[tuple[int, ...], dict[str, int]]] = {}
        self._other: list[int] = []  # the indices of the other keys, in order
        self._compiled: dict[int, re.Pattern[str]] = {}  # compiled when first needed, as re.match would
        for index, key in enumerate(self.keys):
            text = f"{key}"
            if _PLAIN.fullmatch(text):
                dots = tuple(i for i, c in enumerate(text) if c == ".")
                self._plain.setdefault(len(text), {}).setdefault(dots, {}).setdefault(text, index)
            else:
                self._other.append(index)

    def matches(self, index: int, name: str) -> bool:
        """Whether key ``index`` matches ``name`` (peft's regular expression)."""
        compiled = self._compiled.get(index)
        if compiled is None:
            compiled = self._compiled[index] = re.compile(rf"(.*\.)?({self.keys[index]})$")
        return compiled.match(name) is not None

    def _plain_hits(self, name: str) -> Iterator[int]:
        """The indices of the plain keys that match ``name``, a name without a newline."""
        for start in [0] + [i + 1 for i, c in enumerate(name) if c == "."]:  # where a key may begin
            for dots, keys in self._plain.get(len(name) - start, {}).items():
                suffix = list(name[start:])
                for i in dots:
                    suffix[i] = "."
                index = keys.get("".join(suffix))
                if index is not None:
                    yield index

    def first_index(self, name: str) -> int | None:
        """The index of the first key that matches ``name``, or None."""
        if "\n" in name:  # "." and ".*" stop at a newline and "$" matches before one: try every key
            return next((i for i in range(len(self.keys)) if self.matches(i, name)), None)
        best = min(self._plain_hits(name), default=len(self.keys))
        for index in self._other:  # in order, so an invalid key raises where re.match would
            if index >= best:
                break
            if self.matches(index, name):
                return index
        return None if best == len(self.keys) else best

    def plain_matched(self, names: Iterable[str]) -> set[int]:
        """The indices of the plain keys (letters, digits, "_", ".") that match one of ``names``
        at least."""
        other = set(self._other)
        plain = [i for i in range(len(self.keys)) if i not in other]
        found: set[int] = set()
        for name in names:
            found.update((i for i in plain if self.matches(i, name)) if "\n" in name else self._plain_hits(name))
        return found

    def first(self, name: str) -> str | None:
        """The first key that matches ``name``, or None."""
        index = self.first_index(name)
        return None if index is None else self.keys[index]


def pattern_lookup(pattern: Mapping[str, float] | None, default) -> Callable[[str], Any]:
    """A function of a module name: ``pattern[key]`` for the first key matching it, else
    ``default``. The keys are read at the first call, so a pattern that is not a mapping raises
    there."""
    keys: PatternKeys | None = None

    def value(name: str):
        nonlocal keys
        if not pattern:
            return default
        if keys is None:
            keys = PatternKeys(pattern.keys())
        key = keys.first(name)
        return default if key is None else pattern[key]

    return value


def check_alpha_pattern(alpha_pattern: Mapping[str, float] | None, names: Iterable[str]) -> None:
    """Every key must match at least one of ``names`` and every value be a finite number > 0."""
    if not alpha_pattern:
        return
    if not isinstance(alpha_pattern, Mapping):
        raise TypeError(f"alpha_pattern must be a {{pattern: alpha}} dict, got {alpha_pattern!r}")
    names = list(names)
    keys = PatternKeys(alpha_pattern)
    plain_matched = keys.plain_matched(names)
    for index, (key, value) in enumerate(alpha_pattern.items()):
        try:
            re.compile(key)
        except (re.error, TypeError) as err:
            raise ValueError(f"alpha_pattern key {key!r} is not a valid pattern: {err}") from err
        if not (is_finite_number(value) and value > 0):
            raise ValueError(f"alpha_pattern[{key!r}] = {shown_number(value)} must be a finite number > 0")
        if index not in plain_matched and not any(keys.matches(index, n) for n in names):
            raise ValueError(f"alpha_pattern key {key!r} matches none of the adapted modules "
                             f"(e.g. {names[:3]})")
