"""What a rank edit or merge changes, kept so that an edit another process could not make is
taken back here too: under DDP and FSDP2 every process must hold the same ranks.

A rank edit changes, in place, a layer's rank, slot ids and merge state, its pools and their
gradients, and the optimizer state of its pools (with SGD's slots waiting for their first step,
:mod:`lorambo.nn.fresh_momentum`).
:class:`EditSnapshot` records them and puts them back, into the same objects. It leaves out
sharded (FSDP2 DTensor) parameters, gradients and optimizer state:
:func:`lorambo.integrations.fsdp.full_pools` edits full copies of those and simply does not write
them back.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from lorambo.sharding import is_sharded

__all__ = ["EditSnapshot"]

_LAYER_FIELDS = ("_slot_ids", "_slot_edits", "merged", "_weight_before_merge")


class EditSnapshot:
    """The rank, slot ids and merge state of ``layers``, and the values,
    gradients and optimizer state (in each of ``optimizers``) of ``params`` that are not
    sharded, as they are now; :meth:`restore` puts them back: the same gradient objects (a
    gradient the edit set to None too, and none where there was none), and no optimizer state
    for a parameter that had none."""

    def __init__(self, layers: Iterable[nn.Module], params: Iterable[torch.Tensor], optimizers: Iterable):
        params = list(params)
        self.layers = [(layer, layer.rank, {f: _copied(layer.__dict__.get(f)) for f in _LAYER_FIELDS})
                       for layer in layers]
        # (parameter, its values, its .grad object or None, that gradient's values)
        self.values = [(p, p.detach().clone(), p.grad, None if p.grad is None else p.grad.clone())
                       for p in params if not is_sharded(p)]
        self.states = []  # (state dict, its keys now, {key: (object, copy of its values)})
        self.stateless = []  # (optimizer's state, parameter it holds no state for now)
        for one in optimizers:
            for param in params:
                if param in one.state:
                    state = one.state[param]
                    kept = {k: (v, v.clone() if isinstance(v, torch.Tensor) else v)
                            for k, v in state.items() if not is_sharded(v)}
                    self.states.append((state, set(state), kept))
                else:
                    self.stateless.append((one.state, param))

    @classmethod
    def of_pools(cls, layers: Iterable[nn.Module], optimizers: Iterable) -> EditSnapshot:
        """The snapshot of ``layers`` and their lora_A / lora_B pools (a rank edit's whole reach)."""
        layers = list(layers)
        return cls(layers, [p for m in layers for p in (m.lora_A, m.lora_B)], optimizers)

    @torch.no_grad()
    def restore(self) -> None:
        for layer, rank, fields in self.layers:
            layer._set_active_rank(rank)
            layer.__dict__.update(fields)
        for param, value, grad, grad_values in self.values:
            param.copy_(value)
            if grad is not None:  # the same object: a DDP bucket view stays one
                grad.copy_(grad_values)
            if param.grad is not grad:
                param.grad = grad
        for state, param in self.stateless:  # an optimizer step the edit made gave it some
            state.pop(param, None)
        for state, keys, kept in self.states:
            for key in set(state) - keys:
                del state[key]
            for key, (value, values) in kept.items():
                if isinstance(value, torch.Tensor):
                    value.copy_(values)
                state[key] = value


def _copied(value):
    return list(value) if isinstance(value, list) else value
