"""Rank-slot changes of many LoRAMBoLinear pools at once.

ALoRA rounds and online rank moves shrink dozens of layers in one decision. Layer by layer that
is a few small copies per layer plus the same for every optimizer moment; the compiled
``lorambo::pool_remap_`` (csrc/) does every pool and every moment in one parallel pass, measured
1.5x faster than the loop over 224 7B-shaped pools on the 2-core CPU
(benchmarks/results/ext_cpu.md). The result is bit for bit that of calling
:meth:`LoRAMBoLinear.keep_components` on each layer (parameters, gradients, optimizer state);
without the extension that loop runs.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from lorambo.nn.fresh_momentum import move_new_slots
from lorambo.nn.optimizer_state import check_optimizer
from lorambo.nn.optimizer_tracking import warn_if_state_left_behind
from lorambo.ops.backend import use_compiled_multi_tensor

__all__ = ["keep_components_many"]


@torch.no_grad()
def keep_components_many(plans: Iterable[tuple[torch.nn.Module, Sequence[int]]],
                         optimizer: torch.optim.Optimizer | None = None) -> list[int]:
    """``layer.keep_components(keep, optimizer)`` for every ``(layer, keep)``; returns the old
    ranks in order. Every plan is validated before any pool is touched."""
    check_optimizer(optimizer, "keep_components_many")
    plans = [(layer, layer.checked_keep(keep)) for layer, keep in plans]
    layers = [layer for layer, _ in plans]
    if len({id(layer) for layer in layers}) != len(layers):
        raise ValueError("keep_components_many: a layer appears twice; give each layer one plan")
    old = [layer.rank for layer in layers]
    if not plans:
        return old
    from lorambo.ext import ops as ext_ops

    tensors = [t for layer in layers for t, _, _ in ext_ops.pool_slot_tensors(layer, optimizer)]
    if use_compiled_multi_tensor(tensors):
        ext_ops.remap_pools_([(layer, ext_ops.keep_map(keep, layer.rank, layer.capacity)) for layer, keep in plans],
                             optimizer)
        for (layer, keep), old_rank in zip(plans, old):
            layer._set_active_rank(len(keep))
            move_new_slots(layer, keep)
            if keep != list(range(old_rank)):
                warn_if_state_left_behind(layer, optimizer, f"slots {keep} of {old_rank} kept")
    else:
        for layer, keep in plans:
            layer.keep_components(keep, optimizer)
    return old
