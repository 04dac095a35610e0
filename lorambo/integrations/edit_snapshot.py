"""What a rank edit or merge on gathered FSDP2 pools changes outside the pools, kept so that an
edit another process could not make is taken back here too.

:func:`lorambo.integrations.fsdp.full_pools` swaps full copies in for the sharded pools, so
their values, gradients and sharded optimizer state reach the shards only when it writes them
back. Everything else an edit touches is changed in place: a layer's rank, slot ids and merge
state, and the optimizer state that is not sharded (``lorambo.optim.AdamW``'s per-slot step
counts, which every process keeps whole). :class:`EditSnapshot` records those and puts them
back; with the write-back skipped, every process then holds what it held before the call.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from lorambo.sharding import is_sharded

__all__ = ["EditSnapshot"]

_LAYER_FIELDS = ("_slot_ids", "_slot_edits", "merged", "_weight_before_merge")


class EditSnapshot:
    """The rank, slot ids and merge state of ``layers`` and the unsharded optimizer state of
    ``params`` (in each of ``optimizers``), as they are now; :meth:`restore` puts them back,
    into the same tensor objects."""

    def __init__(self, layers: Iterable[nn.Module], params: Iterable[torch.Tensor], optimizers: Iterable):
        self.layers = [(layer, layer.rank, {f: _copied(layer.__dict__.get(f)) for f in _LAYER_FIELDS})
                       for layer in layers]
        self.states = []  # (state dict, its keys now, {key: (object, copy of its values)})
        for one in optimizers:
            for param in params:
                if param in one.state:
                    state = one.state[param]
                    kept = {k: (v, v.clone() if isinstance(v, torch.Tensor) else v)
                            for k, v in state.items() if not is_sharded(v)}
                    self.states.append((state, set(state), kept))

    @torch.no_grad()
    def restore(self) -> None:
        for layer, rank, fields in self.layers:
            layer._set_active_rank(rank)
            layer.__dict__.update(fields)
        for state, keys, kept in self.states:
            for key in set(state) - keys:
                del state[key]
            for key, (value, values) in kept.items():
                if isinstance(value, torch.Tensor):
                    value.copy_(values)
                state[key] = value


def _copied(value):
    return list(value) if isinstance(value, list) else value
