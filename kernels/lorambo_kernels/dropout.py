"""Counter-based dropout for the LoRA branch: the mask is a pure function of (seed, row, col).

Element (m, k) of an [M, K] input is kept when ``philox_uniform(seed, m * K + k) >= p`` and then
multiplied by ``1 / (1 - p)``. Every kernel that needs the mask (the forward down-projection, the
dX epilogue, the dA reduction) calls :func:`dropout_multiplier` with the same (seed, m, k, K), so
forward and backward see the same mask and the mask is never stored.
:func:`dropout_keep_mask` materialises it for tests and for the double-backward fallback.
"""

# (no `from __future__ import annotations`: kernels keep real tl.constexpr annotations)

import torch
import triton
import triton.language as tl

from lorambo_kernels.arguments import checked_seed


@triton.jit
def dropout_multiplier(seed, rows, cols, n_cols, p):
    """0 or 1/(1-p) (fp32) for the elements (rows, cols) of an [*, n_cols] tensor.

    rows: [BM, 1] and cols: [1, BN] index tensors (any int type); offsets are int64 so inputs
    beyond 2**31 elements get distinct numbers.
    """
    offs = rows.to(tl.int64) * n_cols + cols.to(tl.int64)  # (BM, BN)
    keep = tl.rand(seed, offs) >= p
    return tl.where(keep, 1.0 / (1.0 - p), 0.0)


@triton.jit(do_not_specialize=["seed"])
def _keep_mask_kernel(
    out_ptr,  # pointers
    M, K, seed, p,  # sizes / scalars
    stride_om,  # strides
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,  # constexpr
):
    """out[M, K] (int8) = 1 where the LoRA dropout keeps the element."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)[:, None]  # (BM, 1)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)[None, :]  # (1, BK)
    mult = dropout_multiplier(seed, rows, cols, K, p)
    # int64 address: rows * stride_om wraps in int32 on masks of more than 2**31 elements
    tl.store(out_ptr + rows.to(tl.int64) * stride_om + cols, (mult > 0.0).to(tl.int8), mask=(rows < M) & (cols < K))


def dropout_keep_mask(seed: int, M: int, K: int, p: float, device) -> torch.Tensor:
    """The keep mask (bool [M, K]) the LoRA kernels use for ``seed`` and probability ``p``."""
    seed = checked_seed("dropout_keep_mask", seed)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_keep_mask: p={p} must be in [0, 1)")
    out = torch.empty((M, K), dtype=torch.int8, device=device)
    if M == 0 or K == 0:
        return out.bool()
    grid = (triton.cdiv(M, 32), triton.cdiv(K, 32))
    _keep_mask_kernel[grid](out, M, K, seed, float(p), out.stride(0), BLOCK_M=32, BLOCK_K=32)
    return out.bool()
