"""LoRA ops: the PyTorch reference and the backend dispatch."""

from lorambo.ops.dispatch import lora_linear
from lorambo.ops.lora_linear_ref import LoRALinearFunction, dropout_mask, lora_linear_reference

__all__ = ["LoRALinearFunction", "dropout_mask", "lora_linear", "lora_linear_reference"]
