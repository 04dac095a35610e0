"""Layers whose adapter is frozen are left out of rank decisions during training.

A slot that becomes active starts with B = 0, so it trains only through ``lora_B``'s gradient:
a layer whose ``lora_B`` does not require grad (frozen mid-training, or its whole adapter frozen)
would hold a grown slot at zero forever, spending budget on nothing, and cannot relearn what a
dropped component carried. Online growth, rank moves and ALoRA rounds therefore neither grow
nor shrink it. A frozen ``lora_A`` alone (LoRA-FA trains B on fixed A) does not freeze the layer:
new slots train through B.
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["frozen_layers"]


def frozen_layers(layers: Mapping) -> list[str]:
    """Names of ``layers`` (``{name: LoRAMBoLinear}``) whose ``lora_B`` does not require grad, in order."""
    return [name for name, layer in layers.items() if not layer.lora_B.requires_grad]
