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
