"""Parameter counts a peft user expects, with lorambo's pools counted apart.

A pool holds ``capacity`` slots but only ``rank`` of them are active: the inactive ones are zero,
get zero gradient and cost no compute, so they are reported as capacity, not as trainable
parameters. ``trainable`` and ``all`` are what peft reports for the same ranks
(``PeftModel.get_nb_trainable_parameters``): active LoRA parameters plus every other trainable
parameter (e.g. modules_to_save), and the base model plus active LoRA parameters.
"""

from __future__ import annotations

from torch import nn

from lorambo.model.argument import require_module
from lorambo.model.configure import lora_layers

__all__ = ["trainable_parameters", "print_trainable_parameters"]


def trainable_parameters(model: nn.Module) -> dict[str, int | float]:
    """``{"trainable", "all", "trainable_percent", "lora_active", "lora_capacity", "other_trainable"}``.

    ``lora_active``: the active LoRA parameters that train: rank * in per ``lora_A`` and
    rank * out per ``lora_B`` that requires grad (a pool frozen alone, as LoRA-FA freezes A,
    counts as frozen, as peft counts each parameter by its ``requires_grad``);
    ``lora_capacity``: sum of capacity * (in + out) (allocated pool memory, in parameters);
    ``other_trainable``: trainable parameters that are not LoRA pools (shared ones once).
    ``all`` counts what the model holds, each LoRA layer at its active rank. peft's "all params"
    is larger by one frozen original per ``modules_to_save`` module, kept beside its trainable
    copy; lorambo trains such a module in place (only a module with tied weights gets a copy of
    its own, and that copy is counted). ``TypeError`` when ``model`` is not an ``nn.Module``.
    """
    require_module(model, "trainable_parameters")
    layers = lora_layers(model)
    pool_ids = {id(p) for layer in layers.values() for p in (layer.lora_A, layer.lora_B)}
    active = sum(layer.rank * (layer.in_features * layer.lora_A.requires_grad
                               + layer.out_features * layer.lora_B.requires_grad) for layer in layers.values())
    capacity = sum(layer.capacity * (layer.in_features + layer.out_features) for layer in layers.values())
    unique = {id(p): p for p in model.parameters()}  # tied weights once
    other = sum(p.numel() for i, p in unique.items() if i not in pool_ids and p.requires_grad)
    base = sum(p.numel() for i, p in unique.items() if i not in pool_ids)
    lora_all = sum(layer.rank * (layer.in_features + layer.out_features) for layer in layers.values())
    total = base + lora_all
    trainable = active + other
    return {"trainable": trainable, "all": total, "trainable_percent": 100.0 * trainable / max(total, 1),
            "lora_active": active, "lora_capacity": capacity, "other_trainable": other}


def print_trainable_parameters(model: nn.Module) -> dict[str, int | float]:
    """Print peft's line plus the pool capacity and its active slots that train (``lora_active``:
    a frozen pool, as LoRA-FA freezes A, is active but not counted); returns
    :func:`trainable_parameters`. ``TypeError`` when ``model`` is not an ``nn.Module``."""
    require_module(model, "print_trainable_parameters")
    c = trainable_parameters(model)
    print(f"trainable params: {c['trainable']:,} || all params: {c['all']:,} || "
          f"trainable%: {c['trainable_percent']:.4f} || LoRA pool capacity: {c['lora_capacity']:,} "
          f"({c['lora_active']:,} active and trainable)")
    return c
