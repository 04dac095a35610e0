"""PyTorch reference for the LoRA linear op: the CPU path and the oracle for the kernels.

    y = x W^T + b + s * (drop(x) A_r^T) B_r^T,   A_r = A[:r], B_r = B[:, :r]

Only the active slice of the pools is touched (cost follows the rank, not the capacity).
The backward is written by hand and computes only what is asked for:

    t  = drop(x) A_r^T            (M, r)   saved from forward
    t' = dY B_r                   (M, r)
    dX = dY W + s * (t' A_r) * mask/(1-p)
    dA_r = s * t'^T drop(x)       dB_r = s * dY^T t
    dW = dY^T x (only when W requires grad, e.g. for Hessian estimates)

Gradients of inactive slots are exactly zero. When grad mode is on inside backward
(``create_graph=True``, used for Hessian-vector products) the same formulas are evaluated with
differentiable ops on the saved inputs, so double backward is exact.
Dropout masks are regenerated from a seed in backward instead of being stored.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dropout_mask(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """Inverted-dropout multiplier for ``x`` (0 or 1/(1-p)), a pure function of (seed, shape)."""
    gen = torch.Generator(device=x.device)
    gen.manual_seed(seed)
    keep = torch.rand(x.shape, generator=gen, device=x.device) >= p
    return keep.to(x.dtype) / (1.0 - p)


def _drop(x: torch.Tensor, p: float, seed: int | None) -> torch.Tensor:
    return x if p == 0.0 else x * dropout_mask(x, p, seed)


class LoRALinearFunction(torch.autograd.Function):
    """Autograd function over 2-D inputs; see :func:`lora_linear_reference` for shapes."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, rank: int, scaling: float, p: float, seed):
        y = F.linear(x, weight, bias)  # (M, N)
        t = None
        if rank > 0:
            t = _drop(x, p, seed) @ lora_A[:rank].t()  # (M, r)
            y.addmm_(t, lora_B[:, :rank].t(), alpha=scaling)
        ctx.save_for_backward(x, weight, lora_A, lora_B, t)
        ctx.rank, ctx.scaling, ctx.p, ctx.seed = rank, scaling, p, seed
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, lora_A, lora_B, t = ctx.saved_tensors
        need_x, need_w, need_b, need_a, need_bb = ctx.needs_input_grad[:5]
        r, s, p, seed = ctx.rank, ctx.scaling, ctx.p, ctx.seed
        differentiable = torch.is_grad_enabled()
        grad_x = grad_w = grad_b = grad_a = grad_bb = None
        if need_x:
            grad_x = grad_y @ weight  # (M, K)
        if need_w:
            grad_w = grad_y.t() @ x  # (N, K)
        if need_b and ctx.has_bias:
            grad_b = grad_y.sum(0)
        if r > 0 and (need_x or need_a or need_bb):
            a_r, b_r = lora_A[:r], lora_B[:, :r]
            x_drop = _drop(x, p, seed) if (need_a or (differentiable and need_bb)) else None
            if need_x or need_a:
                t_prime = grad_y @ b_r  # (M, r)
            if need_x:
                grad_lora_x = (t_prime @ a_r) * s
                if p > 0.0:
                    grad_lora_x = grad_lora_x * dropout_mask(x, p, seed)
                grad_x = grad_x + grad_lora_x if differentiable else grad_x.add_(grad_lora_x)
            if need_a:
                grad_a = _pad_rows((t_prime.t() @ x_drop) * s, lora_A.shape[0])  # (cap, K)
            if need_bb:
                t_used = x_drop @ a_r.t() if differentiable else t  # recompute to keep the graph
                grad_bb = _pad_cols((grad_y.t() @ t_used) * s, lora_B.shape[1])  # (N, cap)
        if r == 0:
            grad_a = torch.zeros_like(lora_A) if need_a else None
            grad_bb = torch.zeros_like(lora_B) if need_bb else None
        return grad_x, grad_w, grad_b, grad_a, grad_bb, None, None, None, None


def _pad_rows(active: torch.Tensor, capacity: int) -> torch.Tensor:
    """(r, K) -> (capacity, K) with exact zeros in the inactive rows."""
    return F.pad(active, (0, 0, 0, capacity - active.shape[0]))


def _pad_cols(active: torch.Tensor, capacity: int) -> torch.Tensor:
    """(N, r) -> (N, capacity) with exact zeros in the inactive columns."""
    return F.pad(active, (0, capacity - active.shape[1]))


def lora_linear_reference(x, weight, bias, lora_A, lora_B, rank, scaling, dropout_p=0.0, seed=None):
    """LoRA linear on inputs of shape [..., K]; weight [N, K], lora_A [cap, K], lora_B [N, cap].

    ``dropout_p > 0`` needs an integer ``seed``: the same seed gives the same mask.
    """
    if dropout_p > 0.0 and seed is None:
        raise ValueError("lora_linear_reference: dropout_p > 0 needs an integer seed")
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)  # (M, K)
    y = LoRALinearFunction.apply(x2, weight, bias, lora_A, lora_B, rank, scaling, dropout_p, seed)
    return y.reshape(*lead, weight.shape[0])
