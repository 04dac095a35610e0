"""Integrations: transformers' Trainer (``LoRAMBoCallback``), FSDP and checkpoints.

``LoRAMBoCallback`` is imported lazily: importing transformers takes seconds, and the plain
training loop does not need it. The DDP collectives live in :mod:`lorambo.distributed`.
"""

__all__ = ["LoRAMBoCallback"]


def __getattr__(name):
    if name == "LoRAMBoCallback":
        try:
            from lorambo.integrations.trainer import LoRAMBoCallback
        except ModuleNotFoundError as error:
            if error.name != "transformers":
                raise
            raise ImportError("LoRAMBoCallback needs transformers, which is not installed: "
                              "pip install transformers") from error
        return LoRAMBoCallback
    raise AttributeError(f"module 'lorambo.integrations' has no attribute {name!r}")
