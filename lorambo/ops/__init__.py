"""LoRA ops: the PyTorch reference, the backend ops and the backend dispatch."""

from lorambo.ops.dispatch import lora_linear
from lorambo.ops.lora_linear_ref import dropout_mask, lora_linear_reference

__all__ = ["dropout_mask", "lora_linear", "lora_linear_reference"]
