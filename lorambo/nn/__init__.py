"""nn modules: LoRAMBoLinear and the optimizer-state helpers that follow its rank changes."""

from lorambo.nn.lora_linear import LoRAMBoLinear, default_capacity
from lorambo.nn.optimizer_state import gather_slot_state, reset_slot_state
from lorambo.nn.optimizer_tracking import StaleOptimizerStateWarning
from lorambo.nn.pool_ops import keep_components_many

__all__ = ["LoRAMBoLinear", "StaleOptimizerStateWarning", "default_capacity", "gather_slot_state", "keep_components_many", "reset_slot_state"]
