"""Which component each rank slot of a LoRAMBoLinear holds, so that a copy can follow its rank changes.

A weight average (``torch.optim.swa_utils.AveragedModel``, an EMA) is a deep copy of the model
whose parameters it averages element by element. Rank changes edit the model's pools in place:
a grown slot starts a new component, ``keep_components`` moves components to other slots, a
dropped slot is zeroed. The copy keeps its old rank, so it leaves grown slots out and averages
different components in one slot after a move. Each active slot therefore carries an id, new
for every component that starts (growth, a load of the pools, ``reset_parameters``), moved with
its slot by ``keep_components``, -1 for an inactive slot. Ids come from one counter per process,
so a copy's ids are the model's at copy time and never collide with ids the model gets later:
:func:`lorambo.model.averages.follow_ranks` tells, slot by slot, where the copy holds the
component the model holds now.

A ``state_dict`` carries the ids in its metadata (``SLOT_IDS_KEY``), and loading the pools with
their extra state takes them back (:func:`adopt_ids`), so a model and its average resumed from
their checkpoints still hold the same ids for the same components; a load without them (a
safetensors file, a filtered state_dict) starts new components. The counter moves past every id
taken back, so components started later in this process never reuse a saved id; it starts at 0,
so seeded runs save the same state_dict bytes.

Every change of a layer's ids goes through here and adds one to its ``slot_edits`` (a load,
which restarts ids on its way and may take the saved ones back, counts one in all, and none when
it ends with the ids the layer held), so the ids that statistics kept per slot
(``AdaLoRAImportance``) compare cover every path that changes what a slot holds: a rank change,
a move, a load, ``reset_parameters``, an adapter copied in.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

__all__ = ["SLOT_IDS_KEY", "slot_ids", "start_ids", "drop_ids", "keep_ids", "restart_ids", "set_ids", "adopt_ids",
           "move_counter_past"]

SLOT_IDS_KEY = "lorambo_slot_ids"  # in a LoRAMBoLinear's state_dict metadata
_counter_lock = threading.Lock()  # layers change ranks in threads of their own too
_next_id = 0


def _new_ids(count: int) -> range:
    """``count`` consecutive new ids, taken under one hold of the lock."""
    global _next_id
    with _counter_lock:
        first, _next_id = _next_id, _next_id + count
    return range(first, first + count)


def move_counter_past(ids: Sequence[int]) -> None:
    """Components started from now on get ids above ``ids`` (ids made by another process: a
    loaded state_dict, an unpickled layer)."""
    global _next_id
    with _counter_lock:
        _next_id = max(_next_id, max(ids, default=-1) + 1)


def _fresh(layer) -> list[int]:
    rank = layer.rank
    return [*_new_ids(rank), *[-1] * (layer.capacity - rank)]


def slot_ids(layer) -> list[int]:
    """The id of the component in every slot (-1: inactive), a copy."""
    ids = layer.__dict__.get("_slot_ids")
    if ids is None:  # a layer pickled before slots carried ids: its components get ids, unchanged
        ids = layer.__dict__["_slot_ids"] = _fresh(layer)
    return list(ids)


def _write(layer, ids: list[int]) -> None:
    """Store ``ids``, counting an edit if any slot's component changed."""
    if ids != slot_ids(layer):
        layer.__dict__["_slot_edits"] = layer.__dict__.get("_slot_edits", 0) + 1
    layer.__dict__["_slot_ids"] = ids


def start_ids(layer, first: int, last: int) -> None:
    """Slots ``first .. last-1`` start new components."""
    ids = slot_ids(layer)
    ids[first:last] = _new_ids(last - first)
    _write(layer, ids)


def drop_ids(layer, first: int, last: int) -> None:
    """Slots ``first .. last-1`` become inactive."""
    ids = slot_ids(layer)
    ids[first:last] = [-1] * (last - first)
    _write(layer, ids)


def keep_ids(layer, keep: Sequence[int], old_rank: int) -> None:
    """Follow ``keep_components(keep)``: slot j takes the component of slot ``keep[j]``; the
    slots from ``len(keep)`` to ``old_rank`` become inactive."""
    ids = slot_ids(layer)
    ids[:len(keep)] = [ids[k] for k in keep]
    ids[len(keep):old_rank] = [-1] * (old_rank - len(keep))
    _write(layer, ids)


def restart_ids(layer) -> None:
    """Every active slot starts a new component (the pools were loaded or re-initialised)."""
    _write(layer, _fresh(layer))


def set_ids(layer, ids: Sequence[int]) -> None:
    """Give ``layer`` the ids of another layer whose components it now holds in the same slots."""
    _write(layer, list(ids))


def adopt_ids(layer, ids) -> bool:
    """Give ``layer`` the ids saved with the pools and rank it has just loaded, when they describe
    them (one per slot, distinct in the active slots, -1 past the rank); returns whether it did.
    Ids that do not fit leave the new components the load started."""
    if not isinstance(ids, (list, tuple)) or len(ids) != layer.capacity:
        return False
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        return False
    active, rest = list(ids[:layer.rank]), list(ids[layer.rank:])
    if any(i < 0 for i in active) or len(set(active)) != len(active) or any(i != -1 for i in rest):
        return False
    move_counter_past(ids)
    _write(layer, list(ids))
    return True
