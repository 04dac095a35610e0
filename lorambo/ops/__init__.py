"""LoRA ops: the PyTorch reference, the backend ops, the backend selection and the dispatch.

:mod:`lorambo.ops.backend` decides which backend runs (once per request, device type and dtype);
:mod:`lorambo.ops.dispatch` routes each call to that backend's op.
"""

from lorambo.ops.backend import get_backend, set_backend
from lorambo.ops.dispatch import lora_linear
from lorambo.ops.lora_linear_ref import dropout_mask, lora_linear_reference

__all__ = ["dropout_mask", "get_backend", "lora_linear", "lora_linear_reference", "set_backend"]
