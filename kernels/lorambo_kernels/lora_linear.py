"""The LoRA linear layer's forward and backward as sequences of kernel launches.

    y = x W^T (+ b) + s * t B_r^T,      t = drop(x) A_r^T   [M, r], saved for backward
    dX = dY W + s * mask * (t' A_r),    t' = dY B_r          [M, r]
    dA_r = s * t'^T drop(x),  dB_r = s * dY^T t,  db = sum_m dY,  dW = dY^T x

Launches, forward: one (p = 0, r <= 128: t computed in the GEMM's K-loop) or two (t by
``lora_down``, then the GEMM). Backward: the dX GEMM (t' computed in its dY loop and written out),
then one reduction pass over x (dA) and one over dY (dB and the bias gradient); dW only when asked.
So LoRA adds one read of x and one of dY to the frozen layer's traffic, the floor in docs/performance.md.

Gradients of the pools are allocated as zeros of the full pool shape and only the active slice
is written, so inactive slots get exactly zero. All inputs are 2-D here; shapes are checked by the
caller (lorambo.ops.triton_linear) before anything is launched.
"""

from __future__ import annotations

import torch

from lorambo_kernels import config
from lorambo_kernels.fused_gemm import lora_gemm
from lorambo_kernels.lora_skinny import lora_down, lora_wgrad
from lorambo_kernels.arguments import checked_dropout_p, checked_seed


def lora_linear_forward(x, weight, bias, lora_A, lora_B, rank: int, scaling: float,
                        dropout_p: float = 0.0, seed: int = 0):
    """x [M, K], weight [N, K], bias [N] or None, lora_A [cap, K], lora_B [N, cap].

    Returns (y [M, N], t [M, r]) with t = drop(x) A_r^T in x's dtype (empty [M, 0] for r = 0).
    """
    seed = checked_seed("lora_linear_forward", seed)
    dropout_p = checked_dropout_p("lora_linear_forward", dropout_p)
    if rank == 0:
        y, _ = lora_gemm(x, weight.t(), bias)
        return y, x.new_empty((x.shape[0], 0))
    a_r_t = lora_A[:rank].t()  # (K, r)
    b_r_t = lora_B[:, :rank].t()  # (r, N)
    if dropout_p == 0.0 and rank <= config.MAX_BLOCK_R:
        return lora_gemm(x, weight.t(), bias, rank=rank, scaling=scaling, d=a_r_t, v=b_r_t, write_u=True)
    t = lora_down(x, a_r_t, rank, dropout_p, seed)  # (M, r)
    y, _ = lora_gemm(x, weight.t(), bias, rank=rank, scaling=scaling, u=t, v=b_r_t)
    return y, t


def lora_linear_backward(grad_y, x, weight, lora_A, lora_B, t, rank: int, scaling: float,
                         dropout_p: float, seed: int, needs):
    """Gradients (dx, dW, db, dA, dB) for ``needs`` = five bools; None where not needed.

    grad_y [M, N], x [M, K], t [M, r] from :func:`lora_linear_forward` (same rank, p, seed).
    """
    seed = checked_seed("lora_linear_backward", seed)
    dropout_p = checked_dropout_p("lora_linear_backward", dropout_p)
    need_x, need_w, need_b, need_a, need_bb = needs
    grad_x = grad_w = grad_b = grad_a = grad_bb = None
    b_r = lora_B[:, :rank]  # (N, r)
    a_r = lora_A[:rank]  # (r, K)
    t_prime = None
    if need_x:
        if rank == 0:
            grad_x, _ = lora_gemm(grad_y, weight)
        elif rank <= config.MAX_BLOCK_R:
            grad_x, t_prime = lora_gemm(grad_y, weight, rank=rank, scaling=scaling, d=b_r, v=a_r,
                                        write_u=need_a, dropout_p=dropout_p, seed=seed)
        else:
            t_prime = lora_down(grad_y, b_r, rank)
            grad_x, _ = lora_gemm(grad_y, weight, rank=rank, scaling=scaling, u=t_prime, v=a_r,
                                  dropout_p=dropout_p, seed=seed)
    if need_a:
        grad_a = torch.zeros_like(lora_A)
        if rank > 0:
            if t_prime is None:
                t_prime = lora_down(grad_y, b_r, rank)  # (M, r)
            lora_wgrad(x, t_prime, scaling, grad_a[:rank].t(), dropout_p=dropout_p, seed=seed)
    fused_bias = False
    if need_bb:
        grad_bb = torch.zeros_like(lora_B)
        if rank > 0:
            if need_b:
                grad_b = torch.empty(weight.shape[0], dtype=grad_y.dtype, device=grad_y.device)
                fused_bias = True
            lora_wgrad(grad_y, t, scaling, grad_bb[:, :rank], colsum_out=grad_b)
    if need_b and not fused_bias:
        grad_b = grad_y.sum(0)
    if need_w:
        grad_w, _ = lora_gemm(grad_y.t(), x, out_dtype=weight.dtype)
    return grad_x, grad_w, grad_b, grad_a, grad_bb
