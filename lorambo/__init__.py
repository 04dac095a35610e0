"""lorambo: kernel-accelerated LoRA with per-layer rank allocation.

    from lorambo import LoRAMBoLinear, configure_model
    model = configure_model(model, ranks=8)            # or {module_name: rank}
"""

from lorambo.version import __version__ as __version__  # "as": re-exported for mypy --strict (no implicit re-export)
from lorambo.allocation import allocate
from lorambo.allocation.report import read_decisions  # the decision log, as records
from lorambo.adapters import AdapterFormatError, export_peft, load_adapter, save_adapter
from lorambo.ops.backend import get_backend, set_backend
from lorambo.model import configure_model, lora_layers, unload
from lorambo.model.averages import follow_ranks
from lorambo.nn import LoRAMBoLinear, reset_slot_state
from lorambo.optimizer import LoRAMBoOptimizer
from lorambo import optim  # noqa: E402  (lorambo.optim.AdamW)
from lorambo import sensitivity  # noqa: E402  (lorambo.sensitivity.hessian_trace, ...)
from lorambo.adapters.peft_import import from_peft, import_peft  # noqa: E402  peft interop
from lorambo.adapters.peft_patterns import peft_config  # noqa: E402  allocation -> peft.LoraConfig
from lorambo.model.disable import disable_adapter  # noqa: E402  run the frozen base
from lorambo.model.trainable import print_trainable_parameters, trainable_parameters  # noqa: E402
from lorambo.model.frozen_heads import FrozenHeadWarning  # noqa: E402  warning categories, to filter
from lorambo.nn.optimizer_tracking import StaleOptimizerStateWarning  # noqa: E402

__all__ = [
    "AdapterFormatError",
    "FrozenHeadWarning",
    "LoRAMBoLinear",
    "LoRAMBoOptimizer",
    "StaleOptimizerStateWarning",
    "allocate",
    "configure_model",
    "disable_adapter",
    "export_peft",
    "follow_ranks",
    "from_peft",
    "import_peft",
    "get_backend",
    "load_adapter",
    "peft_config",
    "print_trainable_parameters",
    "read_decisions",
    "lora_layers",
    "optim",
    "reset_slot_state",
    "save_adapter",
    "sensitivity",
    "set_backend",
    "trainable_parameters",
    "unload",
]

# dir(lorambo) (and so tab completion) lists the public API; the modules that importing lorambo
# loads (ops, ext, user_warnings, version, ...) stay reachable but are not offered as API.
_DOCUMENTED_SUBPACKAGES = ("allocation", "cli", "experiments", "integrations", "nn")  # optim, sensitivity: in __all__


def __dir__() -> list[str]:
    return sorted(n for n in globals() if n.startswith("__") or n in __all__ or n in _DOCUMENTED_SUBPACKAGES)
