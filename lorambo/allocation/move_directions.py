"""Which way rank moves have taken each layer in a run: rank moves never reverse.

A component that a decision grows starts with ``B = 0``, so its importance score (AdaLoRA's
``|theta * grad|``, or its ablation) is still near zero at the next decision, below almost any
``move_threshold``, and it would be the first a move takes away. The layer that gave a
component, in turn, shows that direction in its gradient again, so its gain rises and it would
be grown back. Left alone, moves undo the previous decision's growth at nearly every decision
(docs/allocation.md, *Rank moves go one way*). So moves go one way per layer over a run: a
layer that has received a rank by a move gives none in a move, and a layer that has given one
is neither grown nor moved into again. Every move takes a rank from a layer that only loses
rank to moves, so at most as many moves happen as those layers hold ranks. Growth that spends
budget left over does not set a way: a layer grown so may still give, and from then on gives
only.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

__all__ = ["move_directions"]


def move_directions(records: Iterable[Mapping]) -> tuple[set[str], set[str]]:
    """``(received, gave)``: the layers that rank moves in ``records`` (decision records, in any
    order; only those with reason ``"move"`` count) have grown, and those they have shrunk."""
    received, gave = set(), set()
    for record in records:
        if record.get("reason") == "move":
            (received if record.get("event") == "grow" else gave).add(record["layer"])
    return received, gave
