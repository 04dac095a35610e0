"""Model-level API: configure_model, lora_layers, unload."""

from lorambo.model.configure import configure_model, lora_layers, unload
from lorambo.model.frozen import frozen_by_lorambo
from lorambo.model.targeting import default_targets, find_targets

__all__ = ["configure_model", "default_targets", "find_targets", "frozen_by_lorambo", "lora_layers", "unload"]
