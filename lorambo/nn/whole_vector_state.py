"""Optimizer state over the whole parameter vector: ``torch.optim.LBFGS``.

LBFGS keeps its curvature memory (past steps and gradient changes, the last direction, the
previous flat gradient) as flat vectors over all its parameters together, under its first
parameter, not per parameter and not per slot. After a rank change those vectors still hold the
coordinates of dropped or moved slots: the next direction then has entries in inactive slots
(a dropped row of A measured 0.52 off zero after one step), which breaks the rule that inactive
slots stay exactly zero, and the active slots follow curvature measured on other coordinates.
No part of that memory belongs to one slot, so a rank change given an LBFGS that holds the
layer's pools restarts it: its state is emptied and its next step is a fresh LBFGS's. An LBFGS
that holds none of them (another model's, passed by mistake) keeps its memory, which no changed
coordinate is part of.
"""

from __future__ import annotations

import torch

from lorambo.nn.optimizer_kind import optimizer_kind

__all__ = ["restart_whole_vector_state"]


def restart_whole_vector_state(optimizer, layers) -> None:
    """Empty the state of an optimizer whose state spans all its parameters (LBFGS) if it holds
    a pool of one of ``layers`` (the LoRAMBoLinear layers whose slots changed); a no-op for every
    other optimizer."""
    if optimizer is None or not issubclass(optimizer_kind(optimizer), torch.optim.LBFGS):
        return
    pools = {id(p) for layer in layers for p in (layer.lora_A, layer.lora_B)}
    held = [param for group in optimizer.param_groups for param in group["params"]]
    if not any(id(param) in pools for param in held):
        return
    for param in held:
        state = optimizer.state.get(param)
        if state:
            state.clear()
