"""Integrations: transformers' Trainer (``LoRAMBoCallback``), FSDP and checkpoints.

``LoRAMBoCallback`` is imported lazily: importing transformers takes seconds, and the plain
training loop does not need it. The DDP collectives live in :mod:`lorambo.distributed`.
"""

from typing import TYPE_CHECKING

__all__ = ["LoRAMBoCallback"]

if TYPE_CHECKING:  # type checkers see the class itself, and no __getattr__ that would make any name Any
    from lorambo.integrations.trainer import LoRAMBoCallback
else:
    def __getattr__(name):
        if name == "LoRAMBoCallback":
            from lorambo.optional import requires

            with requires("transformers", "LoRAMBoCallback"):
                from lorambo.integrations.trainer import LoRAMBoCallback
            # bound here: later lookups skip this hook, and the version check reading package
            # metadata (a millisecond) with it; transformers, once imported, stays that version
            globals()[name] = LoRAMBoCallback
            return LoRAMBoCallback
        raise AttributeError(f"module 'lorambo.integrations' has no attribute {name!r}")
