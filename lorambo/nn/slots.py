"""The link between a pool parameter and its layer's active rank, for slot-aware optimizers.

``lora_A`` (slot = row, dim 0) and ``lora_B`` (slot = column, dim 1) of a LoRAMBoLinear each
carry a tag ``(PoolSlots, slot_dim)``; the ``PoolSlots`` object is shared with the layer, whose
rank changes update ``PoolSlots.rank``. :class:`lorambo.optim.AdamW` reads the tag to update only
the active slots and to count Adam steps per slot. A Parameter's attributes are dropped by
``copy.deepcopy`` (torch rebuilds the tensor), so the layer re-tags its parameters whenever it is
rebuilt from state (``__setstate__``), which covers deepcopy and pickling.
"""

from __future__ import annotations

import torch

_TAG = "_lorambo_slots"

__all__ = ["PoolSlots", "pool_slots", "tag_pool_parameter"]


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
