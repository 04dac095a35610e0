"""Keep a weight average of a model in step with the model's rank changes.

``torch.optim.swa_utils.AveragedModel`` (SWA, an EMA) averages a deep copy of the model
parameter by parameter. After a rank change of the model the copy keeps its old ranks: it
leaves grown slots out (their averages pile up in its inactive slots) and averages different
components in one slot after a move (docs/architecture.md, the rank pool). :func:`follow_ranks`,
called after the rank changes (before the next ``update_parameters``), brings the copy's
LoRAMBoLinear layers to the model's ranks and slot order: every component keeps its average,
moved to the slot the model moved it to; a component the copy has not seen (grown, loaded)
starts its average at the model's current value (B's new columns are zero, so the average's
output does not change); dropped components leave. Which component a slot holds is tracked
by :mod:`lorambo.nn.slot_lineage`.
"""

from __future__ import annotations

import torch
from torch import nn

from lorambo.model.configure import lora_layers
from lorambo.nn.slot_lineage import set_ids, slot_ids
from lorambo.sharding import is_sharded

__all__ = ["follow_ranks"]


@torch.no_grad()
def follow_ranks(average: nn.Module, model: nn.Module) -> list[str]:
    """Bring the LoRAMBoLinear layers of ``average`` (``AveragedModel(model).module``, or any deep
    copy of ``model`` that is averaged) to ``model``'s ranks and slot order, in place; returns the
    names of the layers changed. Both must hold the same layers (names, shapes, capacities); a
    mismatch or a merged layer is a ValueError naming it, before anything changes."""
    if isinstance(average, torch.optim.swa_utils.AveragedModel):
        average = average.module
    if isinstance(model, torch.optim.swa_utils.AveragedModel):
        raise TypeError("follow_ranks(average, model): model is an AveragedModel; pass the trained model second")
    ours, theirs = lora_layers(average), lora_layers(model)
    if list(ours) != list(theirs):
        raise ValueError(f"follow_ranks: the average has LoRA layers {list(ours)[:4]}, the model "
                         f"{list(theirs)[:4]}; pass a copy of the model (AveragedModel(model).module)")
    for name, layer in theirs.items():
        copy = ours[name]
        if (copy.lora_A.shape, copy.lora_B.shape) != (layer.lora_A.shape, layer.lora_B.shape):
            raise ValueError(f"follow_ranks: layer {name!r} has pools {list(copy.lora_A.shape)} / "
                             f"{list(copy.lora_B.shape)} in the average, {list(layer.lora_A.shape)} / "
                             f"{list(layer.lora_B.shape)} in the model")
        if any(is_sharded(p) for p in (copy.lora_A, copy.lora_B, layer.lora_A, layer.lora_B)):
            raise ValueError(f"follow_ranks: layer {name!r} has sharded pools (FSDP2); average the "
                             "gathered adapter instead")
        if copy.merged or layer.merged:
            raise ValueError(f"follow_ranks: layer {name!r} is merged in the "
                             f"{'average' if copy.merged else 'model'}; unmerge() it first")
    changed = []
    for name, layer in theirs.items():
        copy, ids, held = ours[name], slot_ids(layer), slot_ids(ours[name])
        if ids == held and copy.rank == layer.rank:
            continue
        where = {i: k for k, i in enumerate(held) if i >= 0}
        rows = [(where.get(i), j) for j, i in enumerate(ids[:layer.rank])]
        kept = [(k, j) for k, j in rows if k is not None]
        new = [j for k, j in rows if k is None]
        a, b = copy.lora_A, copy.lora_B
        src_a = a.index_select(0, torch.tensor([k for k, _ in kept], dtype=torch.long, device=a.device))
        src_b = b.index_select(1, torch.tensor([k for k, _ in kept], dtype=torch.long, device=b.device))
        a.zero_()
        b.zero_()
        dst = [j for _, j in kept]
        a[dst] = src_a
        b[:, dst] = src_b
        if new:  # components the average has not seen start at the model's values
            a[new] = layer.lora_A[new].to(a.device, a.dtype)
            b[:, new] = layer.lora_B[:, new].to(b.device, b.dtype)
        copy._set_active_rank(layer.rank)
        copy.scaling, copy.alpha, copy.use_rslora = layer.scaling, layer.alpha, layer.use_rslora  # a load may set them
        set_ids(copy, ids)
        changed.append(name)
    return changed
