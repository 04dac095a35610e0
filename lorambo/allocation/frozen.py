"""Layers whose adapter is frozen are left out of rank decisions during training.

A slot that becomes active starts with B = 0, so it trains only through ``lora_B``'s gradient:
a layer whose ``lora_B`` does not require grad (frozen mid-training, or its whole adapter frozen)
would hold a grown slot at zero forever, spending budget on nothing, and cannot relearn what a
dropped component carried. Online growth, rank moves, ALoRA rounds and
``LoRAMBoOptimizer.compute_optimal_ranks`` (which shares the budget left among the other layers)
therefore neither grow nor shrink it. A frozen ``lora_A`` alone (LoRA-FA trains B on fixed A) does not freeze the layer:
new slots train through B.
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["frozen_layers", "frozen_ranks", "without"]


def frozen_layers(layers: Mapping) -> list[str]:
    """Names of ``layers`` (``{name: LoRAMBoLinear}``) whose ``lora_B`` does not require grad, in order."""
    return [name for name, layer in layers.items() if not layer.lora_B.requires_grad]


def frozen_ranks(layers: Mapping, names) -> dict[str, int]:
    """``{name: rank}`` of the layers among ``names`` whose ``lora_B`` is frozen: an allocation
    leaves them at that rank and shares the rest of the budget among the others."""
    return {name: layers[name].rank for name in frozen_layers({n: layers[n] for n in names if n in layers})}


def without(per_layer: Mapping | None, left_out) -> dict | None:
    """``per_layer`` (a ``{name: value}`` allocation input) without the entries of ``left_out``."""
    return None if per_layer is None else {n: v for n, v in per_layer.items() if n not in left_out}
