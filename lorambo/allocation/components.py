"""Rank components ranked across layers: ``(score, layer name, component index)`` entries."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator


def at_most_per_layer(entries: Iterable[tuple], allowed: Callable[[str], int]) -> Iterator[tuple]:
    """``entries`` in their order, keeping only the first ``allowed(layer)`` of each layer (what
    it can give up without going below its lowest rank)."""
    taken: dict = {}
    for entry in entries:
        taken[entry[1]] = taken.get(entry[1], 0) + 1
        if taken[entry[1]] <= allowed(entry[1]):
            yield entry
