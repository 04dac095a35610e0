"""Keep torch.optim state consistent with rank-slot changes of LoRAMBoLinear pools.

A slot s is row s of ``lora_A`` and column s of ``lora_B``. Per-element state tensors
(Adam's exp_avg / exp_avg_sq / max_exp_avg_sq, SGD's momentum_buffer, ...) are recognised as
tensors with the parameter's shape and are edited in place, so the optimizer keeps working.

Why zeroing is required, not cosmetic: Adam with zero gradient still moves a parameter whose
moments are non-zero, so a slot deactivated with stale moments would drift away from 0.
``step`` is one counter per parameter in torch.optim; it is reset to 0 only when every active
slot of the layer is new (e.g. growth from rank 0), where that is exactly a fresh start.
Otherwise newly active slots see Adam's bias correction of the older slots: the same as a
never-used slot in any pooled parameter.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _slot_views(optimizer: torch.optim.Optimizer, layer):
    """Yield (state_tensor, dim) for every per-element state tensor of the layer's pools."""
    for param, dim in ((layer.lora_A, 0), (layer.lora_B, 1)):
        state = optimizer.state.get(param)
        if not state:
            continue
        for value in state.values():
            if torch.is_tensor(value) and value.shape == param.shape:
                yield value, dim


@torch.no_grad()
def reset_slot_state(optimizer: torch.optim.Optimizer, layer, slots: Sequence[int] | range,
                     all_active_new: bool = False) -> None:
    """Zero the optimizer state of ``slots``; with ``all_active_new`` also reset ``step``."""
    index = torch.as_tensor(list(slots), dtype=torch.long)
    if index.numel() == 0:
        return
    for value, dim in _slot_views(optimizer, layer):
        value.index_fill_(dim, index.to(value.device), 0)
    if all_active_new:
        for param in (layer.lora_A, layer.lora_B):
            state = optimizer.state.get(param)
            if state and "step" in state:
                step = state["step"]
                state["step"] = step.zero_() if torch.is_tensor(step) else 0


@torch.no_grad()
def gather_slot_state(optimizer: torch.optim.Optimizer, layer, keep: Sequence[int], old_rank: int) -> None:
    """Move state of slots ``keep`` to slots 0..len(keep)-1 and zero slots len(keep)..old_rank-1,
    mirroring :meth:`LoRAMBoLinear.keep_components`."""
    n = len(keep)
    for value, dim in _slot_views(optimizer, layer):
        src = torch.as_tensor(list(keep), dtype=torch.long, device=value.device)
        moved = value.index_select(dim, src)
        value.narrow(dim, 0, n).copy_(moved)
        if old_rank > n:
            value.narrow(dim, n, old_rank - n).zero_()
