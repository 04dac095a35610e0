"""lorambo: kernel-accelerated LoRA with per-layer rank allocation.

    from lorambo import LoRAMBoLinear, configure_model
    model = configure_model(model, ranks=8)            # or {module_name: rank}
"""

__version__ = "0.1.0"

from lorambo.allocation import allocate
from lorambo.adapters import AdapterFormatError, export_peft, load_adapter, save_adapter
from lorambo.backend import get_backend, set_backend
from lorambo.model import configure_model, lora_layers, unload
from lorambo.nn import LoRAMBoLinear, reset_slot_state
from lorambo.optimizer import LoRAMBoOptimizer
from lorambo import optim  # noqa: E402  (lorambo.optim.AdamW)
from lorambo import sensitivity  # noqa: E402  (lorambo.sensitivity.hessian_trace, ...)

__all__ = [
    "AdapterFormatError",
    "LoRAMBoLinear",
    "LoRAMBoOptimizer",
    "allocate",
    "configure_model",
    "export_peft",
    "get_backend",
    "load_adapter",
    "lora_layers",
    "optim",
    "reset_slot_state",
    "save_adapter",
    "sensitivity",
    "set_backend",
    "unload",
]
