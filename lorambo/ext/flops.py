"""FLOP counts of the LoRA linear ops for ``torch.utils.flop_counter.FlopCounterMode``.

Without a formula the mode counts a custom op as 0 FLOPs, so profiles and MFU figures would show
LoRA layers as free. The counts follow the convention of torch's own formulas: 2*M*K*N per
[M, K] x [K, N] product, elementwise work (bias, scaling, dropout) not counted. ``rank`` is the
active rank r the op receives, not the pool capacity: the ops only touch A[:r] and B[:, :r].

    forward   y = x W^T + s * (drop(x) A_r^T) B_r^T     2MKN + 2MKr + 2MrN
    backward  dX = dY W + s * (dY B_r) A_r              2MNK + 2MNr + 2MrK
              dA_r = s * (dY B_r)^T drop(x)             2MNr (shared with dX) + 2MrK
              dB_r = s * dY^T t                         2MNr
              dW = dY^T x                               2MNK

with x [M, K], W [N, K]; the backward counts only the gradients the op was asked for, as the
kernels compute only those (dY B_r once when both dX and dA are wanted).

Registered for every namespace that defines the op (``lorambo``: the compiled extension, by
:func:`lorambo.ext.loader.load`; ``lorambo_ref`` / ``lorambo_ext`` / ``lorambo_triton``: the
custom ops of :mod:`lorambo.ops.custom_op`).
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import flop_registry, register_flop_formula

__all__ = ["lora_forward_flops", "lora_backward_flops", "register_lora_flop_formulas"]


def lora_forward_flops(m, k, n, rank):
    """FLOPs of y = x W^T + s * (x A_r^T) B_r^T for x [m, k], W [n, k]."""
    return 2 * m * k * n + 2 * m * k * rank + 2 * m * rank * n


def lora_backward_flops(m, k, n, rank, needs):
    """FLOPs of the gradients ``needs`` = (x, W, bias, A, B) asks for (same shapes as forward)."""
    need_x, need_w, _need_b, need_a, need_bb = needs
    flops = 0
    if need_x or need_a:
        flops += 2 * m * n * rank  # t' = dY B_r, shared by dX and dA
    if need_x:
        flops += 2 * m * n * k + 2 * m * rank * k
    if need_a:
        flops += 2 * m * rank * k
    if need_bb:
        flops += 2 * m * n * rank
    if need_w:
        flops += 2 * m * n * k
    return flops


def _fwd_formula(x_shape, weight_shape, bias_shape, a_shape, b_shape, rank, *args, out_shape=None, **kwargs):
    return lora_forward_flops(x_shape[0], x_shape[1], weight_shape[0], rank)


def _bwd_formula(grad_y_shape, x_shape, weight_shape, a_shape, b_shape, t_shape, rank, scaling, p, seed, *needs,
                 out_shape=None, **kwargs):
    # lorambo::lora_linear_bwd takes the five flags as one bool[5]; the custom ops as five bools
    flags = tuple(needs[0]) if len(needs) == 1 else needs
    return lora_backward_flops(x_shape[0], x_shape[1], weight_shape[0], rank, flags)


def _composite_formula(x_shape, weight_shape, bias_shape, a_shape, b_shape, rank, *args, out_shape=None, **kwargs):
    # lorambo::lora_linear seen whole (below autograd, e.g. inference mode): the forward alone
    m = 1
    for size in x_shape[:-1]:
        m *= size
    return lora_forward_flops(m, x_shape[-1], weight_shape[0], rank)


def register_lora_flop_formulas(namespace: str) -> None:
    """Register the formulas for ``torch.ops.<namespace>.lora_linear_fwd`` / ``lora_linear_bwd``
    (and ``lora_linear`` where the namespace has it); registering twice is a no-op."""
    ops = getattr(torch.ops, namespace)
    targets = [(ops.lora_linear_fwd, _fwd_formula), (ops.lora_linear_bwd, _bwd_formula)]
    if hasattr(ops, "lora_linear"):
        targets.append((ops.lora_linear, _composite_formula))
    for packet, formula in targets:
        if packet not in flop_registry:  # torch raises on a duplicate registration
            register_flop_formula(packet)(formula)
