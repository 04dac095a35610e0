"""Adapters on disk (lorambo's safetensors format, peft's format both ways) and lorambo's
ranks as a peft.LoraConfig.

``peft_config`` is :func:`lorambo.peft_config` (a ``peft.LoraConfig`` to train with);
``peft_adapter_config`` is the adapter_config.json content that ``export_peft`` writes.
"""

from lorambo.adapters.io import AdapterFormatError, load_adapter, save_adapter
from lorambo.adapters.peft_export import export_peft, peft_adapter_config
from lorambo.adapters.peft_import import from_peft, import_peft
from lorambo.adapters.peft_patterns import peft_config

__all__ = ["AdapterFormatError", "export_peft", "from_peft", "import_peft", "load_adapter", "peft_adapter_config",
           "peft_config", "save_adapter"]
