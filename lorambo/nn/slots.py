"""The link between a pool parameter and its layer's active rank, for slot-aware optimizers.

``lora_A`` (slot = row, dim 0) and ``lora_B`` (slot = column, dim 1) of a LoRAMBoLinear each
carry a tag ``(PoolSlots, slot_dim)``; the ``PoolSlots`` object is shared with the layer, whose
rank changes update ``PoolSlots.rank``. :class:`lorambo.optim.AdamW` reads the tag to update only
the active slots and to count Adam steps per slot.

A tag is an attribute of one Parameter object, and several things replace the object: deepcopy
and pickling, ``load_state_dict(assign=True)``, ``Module._apply`` when it does not convert in
place, and FSDP2's ``fully_shard`` (DTensor parameters). The layer therefore tags whatever
Parameter is set as its pool (``__setattr__``, which FSDP2 goes through for modules that define
it), after ``_apply`` and after ``__setstate__``.
"""

from __future__ import annotations

import torch

from lorambo.sharding import local_region

_TAG = "_lorambo_slots"

__all__ = ["PoolSlots", "pool_slots", "tag_pool_parameter", "local_slots"]


class PoolSlots:
    """Slots ``0 .. rank-1`` of the pool are active; the rest are exactly zero."""

    __slots__ = ("rank",)

    def __init__(self, rank: int = 0):
        self.rank = rank

    def __getstate__(self):
        return self.rank

    def __setstate__(self, rank):
        self.rank = rank


def tag_pool_parameter(param: torch.nn.Parameter, slots: PoolSlots, slot_dim: int) -> None:
    """Mark ``param`` as a rank pool whose slots lie along ``slot_dim``."""
    setattr(param, _TAG, (slots, slot_dim))


def pool_slots(param: torch.Tensor) -> tuple[PoolSlots, int] | None:
    """``(slots, slot_dim)`` for a pool parameter, None for any other tensor."""
    return getattr(param, _TAG, None)


def local_slots(param: torch.Tensor, slot_dim: int) -> tuple[int, int]:
    """``(first, count)``: the slots of a pool this process holds, as global slot indices
    ``first .. first+count-1``; local index ``i`` along ``slot_dim`` is slot ``first + i``. The
    whole pool unless it is a DTensor sharded along its slots (``lora_A`` under FSDP2)."""
    held = local_region(param)[slot_dim]
    return held.start, held.stop - held.start
