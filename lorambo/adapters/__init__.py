"""Adapters on disk: lorambo's safetensors format and export to peft."""

from lorambo.adapters.io import AdapterFormatError, load_adapter, save_adapter
from lorambo.adapters.peft_export import export_peft, peft_config

__all__ = ["AdapterFormatError", "export_peft", "load_adapter", "peft_config", "save_adapter"]
