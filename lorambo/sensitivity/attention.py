"""An attention path with a double backward, for the duration of Hessian-vector products.

Exact Hessian-vector products differentiate the backward pass. PyTorch's fused attention
kernels (the CPU flash kernel behind ``scaled_dot_product_attention``, flash and memory-efficient
attention on CUDA) have a backward that is not itself differentiable, so a stock Hugging Face
model, which calls SDPA by default, fails with "derivative for
aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented".

:func:`double_backward_attention` fixes that for a block of code:

- every SDPA call inside it runs PyTorch's *math* backend, which is composed of ordinary
  differentiable ops (same function, up to float rounding);
- a transformers model configured with another attention implementation (flash-attention-2,
  flex attention, ...) is switched to ``"eager"`` and switched back on exit, also on error.

The estimators (``hessian_trace``, ``hessian_opnorm``, Hutch++ and XTrace) enter it around every
forward and double backward, so they work on models as shipped. The math backend materialises
the [T, T] attention matrix, which costs memory for long sequences; first-order estimators
(gradients, Fisher, covariances) do not use it.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn

__all__ = ["double_backward_attention"]

_DOUBLE_BACKWARD_SAFE = (None, "eager", "sdpa")  # sdpa is made safe by the math backend


def _math_sdpa():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


def _hf_models(model: nn.Module) -> list[nn.Module]:
    """Outermost submodules that are transformers models (they carry the attention setting)."""
    found, prefixes = [], []
    for name, module in model.named_modules():
        if any(name.startswith(p) for p in prefixes):
            continue
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            found.append(module)
            prefixes.append(name + "." if name else "")
    return found


def _set_attention(module: nn.Module, implementation: str) -> None:
    setter = getattr(module, "set_attn_implementation", None)
    if callable(setter):
        setter(implementation)
    else:  # transformers releases without the setter read the config field at call time
        module.config._attn_implementation = implementation


@contextlib.contextmanager
def double_backward_attention(model: nn.Module) -> Iterator[None]:
    """Run the block with attention that supports double backward; restore everything after."""
    switched = []
    try:
        for module in _hf_models(model):
            current = module.config._attn_implementation
            if current not in _DOUBLE_BACKWARD_SAFE:
                _set_attention(module, "eager")
                switched.append((module, current))
        with _math_sdpa():
            yield
    finally:
        for module, previous in reversed(switched):
            _set_attention(module, previous)
