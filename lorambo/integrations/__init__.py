"""Integrations: transformers' Trainer (``LoRAMBoCallback``) and DDP helpers (``distributed``).

``LoRAMBoCallback`` is imported lazily: importing transformers takes seconds, and the DDP helpers
and the plain training loop do not need it.
"""

from lorambo.integrations import distributed

__all__ = ["LoRAMBoCallback", "distributed"]


def __getattr__(name):
    if name == "LoRAMBoCallback":
        from lorambo.integrations.trainer import LoRAMBoCallback

        return LoRAMBoCallback
    raise AttributeError(f"module 'lorambo.integrations' has no attribute {name!r}")
