"""Adapters on disk: lorambo's safetensors format and export to peft."""

from lorambo.adapters.io import AdapterFormatError, load_adapter, save_adapter
from lorambo.adapters.peft_export import export_peft, peft_config
from lorambo.adapters.peft_import import from_peft, import_peft

__all__ = ["AdapterFormatError", "export_peft", "from_peft", "import_peft", "load_adapter", "peft_config",
           "save_adapter"]
