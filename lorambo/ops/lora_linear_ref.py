"""PyTorch reference for the LoRA linear op: the CPU path and the oracle for the kernels.

    y = x W^T + b + s * (drop(x) A_r^T) B_r^T,   A_r = A[:r], B_r = B[:, :r]

Only the active slice of the pools is touched (cost follows the rank, not the capacity).
The backward is written by hand and computes only what is asked for:

    t  = drop(x) A_r^T            (M, r)   saved from forward
    t' = dY B_r                   (M, r)
    dX = dY W + s * (t' A_r) * mask/(1-p)
    dA_r = s * t'^T drop(x)       dB_r = s * dY^T t
    dW = dY^T x (only when W requires grad, e.g. for Hessian estimates)

Gradients of inactive slots are exactly zero. The op is the custom op
``torch.ops.lorambo_ref.lora_linear_fwd`` (see :mod:`lorambo.ops.custom_op`): traceable by
torch.compile with fullgraph=True (dropout included), exact double backward for
Hessian-vector products, and dropout masks regenerated from the seed in backward, not stored.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lorambo.ops.custom_op import define_lora_op
from lorambo.ops.op_operands import check_multiplier_call, check_operands, check_scalars
from lorambo.ops.output_rows import rows_to_output
from lorambo.ops.seed_argument import check_seed


def dropout_mask(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """Inverted-dropout multiplier for ``x`` (0 or 1/(1-p)), a pure function of (seed, shape,
    device type) that reads every bit of the seed, as the other backends' masks do. ``p`` in
    [0, 1); where p > 0 the seed is one the op takes (an int in [0, 2**63) or a 0-d int64 CPU
    tensor), else a ValueError: a truncated seed (3.5 -> 3) would give another seed's mask."""
    check_multiplier_call("dropout_mask", x, p, seed)
    return _mask(x, p, int(seed))


def _mask(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """:func:`dropout_mask` on arguments already checked (the public op's and the registered
    ops' checks ran): what the forward and backward call at every step."""
    keep = _uniform(x, seed) >= p
    return keep.to(x.dtype) / (1.0 - p)


def _uniform(x: torch.Tensor, seed: int) -> torch.Tensor:
    """Draws uniform in [0, 1), shaped like ``x``, from torch's generator on x's device seeded by ``seed``.

    torch's CPU generator (mt19937) keeps only the low 32 bits of its seed, so on CPU a seed with
    high bits adds, modulo 1, float64 draws of a second stream keyed by those bits: the sum of an
    independent uniform is uniform again, and seeds that differ only in the high bits give
    independent masks. (Float64 draws take two words of the stream per element where float32
    draws take one, so the low and the high bits do not enter alike: seeds (a, b) and (b, a) of
    the two halves differ too.) The CUDA generator (Philox) takes all 64 bits itself."""
    if x.device.type == "meta":  # meta tensors carry no values and have no generator
        return torch.empty(x.shape, device="meta", dtype=torch.float32)
    gen = torch.Generator(device=x.device).manual_seed(seed)
    # float32 draws, not torch's default dtype: a default changed between the forward and the
    # backward (which regenerates the mask) would drop other elements there
    u = torch.rand(x.shape, generator=gen, device=x.device, dtype=torch.float32)
    high = seed >> 32
    if x.device.type != "cpu" or high == 0:
        return u
    gen.manual_seed(high)
    return torch.frac(u.double() + torch.rand(x.shape, generator=gen, dtype=torch.float64))


def _drop(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    return x if p == 0.0 else x * _mask(x, p, seed)


def _forward(x, weight, bias, lora_A, lora_B, rank, scaling, p, seed):
    y = F.linear(x, weight, bias)  # (M, N)
    if rank == 0:
        return y, x.new_empty((x.shape[0], 0))
    t = _drop(x, p, seed) @ lora_A[:rank].t()  # (M, r)
    y.addmm_(t, lora_B[:, :rank].t(), alpha=scaling)
    return y, t


def _backward(grad_y, x, weight, lora_A, lora_B, t, rank, scaling, p, seed, needs):
    need_x, need_w, need_b, need_a, need_bb = needs
    grad_x = grad_w = grad_b = grad_a = grad_bb = None
    if need_x:
        grad_x = grad_y @ weight  # (M, K)
    if need_w:
        grad_w = grad_y.t() @ x  # (N, K)
    if need_b:
        grad_b = grad_y.sum(0)
    if rank > 0 and (need_x or need_a or need_bb):
        a_r, b_r = lora_A[:rank], lora_B[:, :rank]
        mask = _mask(x, p, seed) if p > 0.0 and (need_x or need_a) else None  # regenerated
        if need_x or need_a:
            t_prime = grad_y @ b_r  # (M, r)
        if need_x:
            grad_lora_x = (t_prime @ a_r) * scaling
            if mask is not None:
                grad_lora_x *= mask
            grad_x += grad_lora_x
        # The pool gradients are padded out of place, not written into zeros: under vmap
        # (batched Hessian-vector products, is_grads_batched=True) grad_y is batched and a
        # batched value cannot be copied into an unbatched buffer.
        if need_a:
            x_drop = x if mask is None else x * mask
            grad_a = F.pad((t_prime.t() @ x_drop) * scaling, (0, 0, 0, lora_A.shape[0] - rank))  # (cap, K)
        if need_bb:
            grad_bb = F.pad((grad_y.t() @ t) * scaling, (0, lora_B.shape[1] - rank))  # (N, cap)
    if need_a and grad_a is None:
        grad_a = torch.zeros_like(lora_A)
    if need_bb and grad_bb is None:
        grad_bb = torch.zeros_like(lora_B)
    return grad_x, grad_w, grad_b, grad_a, grad_bb


def _check_backend(op: str, x) -> None:
    if not x.dtype.is_floating_point:  # the hand-written backward has no complex conjugates
        raise TypeError(f"{op}: x has dtype {x.dtype}; the op computes in a real floating dtype (float32, "
                        "float64, bfloat16 or float16), as the other backends' ops do")


_apply = define_lora_op("lorambo_ref", _forward, _backward, _mask, check_backend=_check_backend)


def lora_linear_reference(x, weight, bias, lora_A, lora_B, rank, scaling, dropout_p=0.0, seed=None):
    """LoRA linear on inputs of shape [..., K]; weight [N, K], lora_A [cap, K], lora_B [N, cap].

    ``dropout_p > 0`` needs a ``seed``: an int, or a 0-d int64 CPU tensor (what torch.compile
    carries as a graph value); the same seed gives the same mask.
    """
    check_operands("lora_linear_reference", x, weight, bias, lora_A, lora_B)
    # The slicing below would not notice a bad rank: A[:-1] drops the last slot, A[:cap + 1]
    # clips; p = 1 divides by zero; a nan scaling fills the output with nan. The other backends'
    # ops refuse these too, and complex dtypes.
    check_scalars("lora_linear_reference", rank, lora_A.shape[0], scaling, dropout_p)
    if dropout_p > 0.0:
        check_seed("lora_linear_reference", seed)
    _check_backend("lora_linear_reference", x)
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)  # (M, K)
    p = float(dropout_p)
    y = _apply(x2, weight, bias, lora_A, lora_B, rank, float(scaling), p, seed if p > 0.0 else 0)
    return rows_to_output(y, lead)
