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

__all__ = ["PoolSlots", "pool_slots", "tag_pool_parameter", "local_slots", "pools_generation", "POOL_SLOT_DIMS",
           "used_slots"]

POOL_SLOT_DIMS = {"lora_A": 0, "lora_B": 1}  # the dim along which each pool's rank slots lie

# Bumped by every rank change and every (re)tagged pool Parameter, so that per-step work over the
# pools (lorambo/nn/inactive_slots.py) can reuse what it computed while nothing changed.
_generation = 0


def pools_generation() -> int:
    """A number that changes whenever any pool's rank or Parameter object changes."""
    return _generation


def _bump() -> None:
    global _generation
    _generation += 1


class PoolSlots:
    """Slots ``0 .. rank-1`` of the pool are active; the rest are exactly zero."""

    __slots__ = ("_rank",)

    def __init__(self, rank: int = 0):
        self.rank = rank

    @property
    def rank(self) -> int:
        return self._rank

    @rank.setter
    def rank(self, rank: int) -> None:
        self._rank = rank
        _bump()

    def __getstate__(self):
        return self._rank

    def __setstate__(self, rank):
        self.rank = rank


def tag_pool_parameter(param: torch.nn.Parameter, slots: PoolSlots, slot_dim: int) -> None:
    """Mark ``param`` as a rank pool whose slots lie along ``slot_dim``."""
    setattr(param, _TAG, (slots, slot_dim))
    _bump()


def pool_slots(param: torch.Tensor) -> tuple[PoolSlots, int] | None:
    """``(slots, slot_dim)`` for a pool parameter, None for any other tensor."""
    return getattr(param, _TAG, None)


def local_slots(param: torch.Tensor, slot_dim: int) -> tuple[int, int]:
    """``(first, count)``: the slots of a pool this process holds, as global slot indices
    ``first .. first+count-1``; local index ``i`` along ``slot_dim`` is slot ``first + i``. The
    whole pool unless it is a DTensor sharded along its slots (``lora_A`` under FSDP2)."""
    held = local_region(param)[slot_dim]
    return held.start, held.stop - held.start


def used_slots(pool: torch.Tensor, dim: int) -> int:
    """One past the last slot (index along ``dim``) of ``pool`` holding a non-zero value; 0 if none."""
    used = pool.abs().sum(dim=1 - dim).nonzero()
    return int(used.max()) + 1 if used.numel() else 0
