"""Keep adapted layers inside the forward of torch's own Transformer modules.

In eval mode, ``nn.TransformerEncoderLayer`` has a fast path that reads ``linear1.weight`` and
``linear2.weight`` and runs ``torch._transformer_encoder_layer_fwd`` without calling those
modules: an adapter there would be skipped, and eval outputs would silently be the base
model's. The layer takes its ordinary path when any of its modules has a forward hook, so an
encoder layer holding a LoRAMBoLinear gets a no-op forward pre-hook. ``nn.TransformerEncoder``
also turns padded batches into nested tensors for that fast path, which the ordinary path of an
adapted layer does not take, so its ``use_nested_tensor`` is switched off while it holds
adapters. :func:`sync_fast_paths` applies both after every configure and unload, and puts back
what it changed once no adapter is left.
"""

from __future__ import annotations

from torch import nn

from lorambo.nn import LoRAMBoLinear

_NESTED_WAS_ON = "_lorambo_use_nested_tensor_was_on"


def _ordinary_path(module: nn.Module, args) -> None:
    """Forward pre-hook that changes nothing: its presence turns the encoder layer's fast path off."""
    return None


def _holds_adapter(module: nn.Module) -> bool:
    return any(isinstance(m, LoRAMBoLinear) for m in module.modules())


def sync_fast_paths(model: nn.Module) -> None:
    """Fast paths off in the Transformer modules that hold adapters, back on in the others."""
    for module in model.modules():
        if isinstance(module, nn.TransformerEncoderLayer):
            hooked = [key for key, hook in module._forward_pre_hooks.items() if hook is _ordinary_path]
            if _holds_adapter(module) and not hooked:
                module.register_forward_pre_hook(_ordinary_path)
            elif hooked and not _holds_adapter(module):
                for key in hooked:
                    del module._forward_pre_hooks[key]
        elif isinstance(module, nn.TransformerEncoder):
            if _holds_adapter(module) and getattr(module, "use_nested_tensor", False):
                module.use_nested_tensor = False
                setattr(module, _NESTED_WAS_ON, True)
            elif module.__dict__.get(_NESTED_WAS_ON) and not _holds_adapter(module):
                module.use_nested_tensor = True
                delattr(module, _NESTED_WAS_ON)
