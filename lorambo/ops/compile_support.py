"""Helpers for tracing lorambo layers with torch.compile."""

from __future__ import annotations

import torch


def dynamic_int_attribute(module: torch.nn.Module, name: str) -> int:
    """``getattr(module, name)``, read under torch.compile as a dynamic (symbolic) int.

    Dynamo treats int attributes of an nn.Module as constants and guards on their value, so a
    layer whose rank changes would recompile for every rank and soon hit the recompile limit.
    Read here, inside ``torch._dynamo.patch_dynamo_config(allow_unspec_int_on_nn_module=True)``
    (a config patch that Dynamo applies while tracing), the attribute follows automatic dynamic
    shapes instead: the first value compiles as a constant (0 and 1 always do), a second value
    recompiles once with a symbolic int, and later values reuse that graph. Outside torch.compile
    this is a plain attribute read (entering the patch costs ~0.5 ms, so eager never does).
    Torch versions without ``patch_dynamo_config`` fall back to the plain read (a recompile per value).
    """
    if torch.compiler.is_compiling():
        patch = getattr(torch._dynamo, "patch_dynamo_config", None)
        if patch is not None:
            with patch(allow_unspec_int_on_nn_module=True):
                return getattr(module, name) + 0  # "+ 0" wraps the value inside the patch
    return getattr(module, name)


@torch.compiler.assume_constant_result
def autocast_available(device_type: str) -> bool:
    """``torch.amp.is_autocast_available(device_type)``, constant under torch.compile.

    torch 2.11's Dynamo cannot trace ``torch._C._is_autocast_available`` (torch 2.13's can): a
    fullgraph compile of a LoRAMBoLinear failed with ``Unsupported``. The answer depends only on
    the device type, so Dynamo evaluates it once while tracing and keeps the result as a constant.
    """
    return torch.amp.is_autocast_available(device_type)
