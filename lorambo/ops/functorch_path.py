"""The LoRA linear op under ``torch.func`` transforms (grad, vmap, jvp, jacrev, hessian) and
forward-mode AD (``torch.autograd.forward_ad`` dual tensors).

The backends' ops run an ``autograd.Function`` (or the extension's C++ one) for speed; functorch
transforms refuse both, and neither has a forward-mode (jvp) rule. Inside a transform or a
forward-AD level the op is therefore written with plain differentiable torch ops, so every
transform composes as it does through ``nn.Linear``:

    y = x W^T + b + s * (drop(x) A_r^T) B_r^T

Same math as the other paths; the gradients of inactive pool slots are exactly zero (they lie
outside the slices). Dropout is torch's own ``F.dropout``, drawn from torch's generator like
``nn.Dropout``, so it follows vmap's ``randomness`` flag (a seeded mask would give every sample
of ``randomness="different"`` the same one).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd import forward_ad

__all__ = ["needs_composite", "lora_linear_composite"]


def needs_composite() -> bool:
    """True inside a ``torch.func`` transform or a ``forward_ad.dual_level()`` (and not while
    torch.compile traces). Inside a dual level every call takes the composite path, dual inputs
    or not: telling them apart would cost a tangent lookup per tensor."""
    return not torch.compiler.is_compiling() and (torch._C._are_functorch_transforms_active()
                                                  or forward_ad._current_level >= 0)


def lora_linear_composite(x, weight, bias, lora_A, lora_B, rank: int, scaling: float,
                          dropout_p: float = 0.0) -> torch.Tensor:
    """LoRA linear on inputs [..., K] from differentiable torch ops."""
    x_drop = F.dropout(x, dropout_p, training=True) if dropout_p > 0.0 else x
    return F.linear(x, weight, bias) + scaling * F.linear(F.linear(x_drop, lora_A[:rank]), lora_B[:, :rank])
