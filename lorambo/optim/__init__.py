"""Optimizers that know about rank pools: per-slot state for LoRAMBoLinear pools."""

from lorambo.optim.adamw import AdamW

__all__ = ["AdamW"]
