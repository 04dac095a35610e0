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
from lorambo.nn.optimizer_argument import OptimizerArgument, each_optimizer, optimizer_argument
from lorambo.nn.optimizer_state import check_slot_state_editable
from lorambo.nn.optimizer_tracking import warn_if_state_left_behind
from lorambo.nn.slot_lineage import keep_ids
from lorambo.nn.whole_vector_state import restart_whole_vector_state
from lorambo.ops.backend import use_compiled_multi_tensor
from lorambo.user_warnings import warns_when_done

__all__ = ["keep_components_many"]


@warns_when_done  # a warning raised as an error must not leave some layers edited
@torch.no_grad()
def keep_components_many(plans: Iterable[tuple[torch.nn.Module, Sequence[int]]],
                         optimizer: OptimizerArgument | None = None) -> list[int]:
    """``layer.keep_components(keep, optimizer)`` for every ``(layer, keep)``; returns the old
    ranks in order. Every plan is validated before any pool is touched. ``optimizer`` may be a
    list of optimizers: each one's state moves for the pools it holds."""
    optimizer = optimizer_argument(optimizer, "keep_components_many")
    plans = [(layer, layer.checked_keep(keep)) for layer, keep in plans]
    for layer, keep in plans:
        if keep != list(range(layer.rank)):
            check_slot_state_editable(optimizer, layer)
    layers = [layer for layer, _ in plans]
    if len({id(layer) for layer in layers}) != len(layers):
        raise ValueError("keep_components_many: a layer appears twice; give each layer one plan")
    old = [layer.rank for layer in layers]
    plans = [(layer, keep) for layer, keep in plans if keep != list(range(layer.rank))]  # the others keep all
    if not plans:
        return old
    from lorambo.ext import ops as ext_ops

    tensors = [t for layer, _ in plans for t, _, _ in ext_ops.pool_slot_tensors(layer, optimizer)]
    if use_compiled_multi_tensor(tensors):
        ext_ops.remap_pools_([(layer, ext_ops.keep_map(keep, layer.rank, layer.capacity)) for layer, keep in plans],
                             optimizer)
        for layer, keep in plans:
            old_rank = layer.rank
            layer._set_active_rank(len(keep))
            keep_ids(layer, keep, old_rank)
            warn_if_state_left_behind(layer, optimizer, f"slots {keep} of {old_rank} kept")
            for one in each_optimizer(optimizer, layer):
                restart_whole_vector_state(one, [layer])  # LBFGS: no per-slot state to move
                move_new_slots(one, layer, keep, old_rank)  # SGD's slots waiting for their first step
    else:
        for layer, keep in plans:
            layer.keep_components(keep, optimizer)
    return old
