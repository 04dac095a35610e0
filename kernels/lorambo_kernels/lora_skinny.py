"""Skinny LoRA GEMMs: the down-projection ``[M, r]`` and the pool gradients ``[P, r]``.

    lora_down:  out[M, r] = drop(a)[M, K] b[K, r]           t = drop(x) A_r^T,  t' = dY B_r
    lora_wgrad: out[P, r] = s * drop(a)^T[P, M] u[M, r]     dA_r^T = s drop(x)^T t',  dB_r = s dY^T t
                (+ colsum[P] = sum_m a[m, :], the bias gradient, from the same pass over dY)

Both are bandwidth bound: they read a once (per chunk of 128 ranks) and never touch pool slots
>= r. The wgrad reduction over the long M axis is split into SPLIT_M deterministic fp32 partials
(summed by one torch reduction) instead of atomics, so gradients are bit-reproducible.
"""

# (no `from __future__ import annotations`: kernels keep real tl.constexpr annotations)

import torch
import triton
import triton.language as tl

from lorambo_kernels import config
from lorambo_kernels.common import downcast, mma
from lorambo_kernels.dropout import dropout_multiplier
from lorambo_kernels.arguments import checked_dropout_p, checked_seed


# Run-time ints that follow the rank (see fused_gemm.RANK_DEPENDENT): left unspecialised so a
# rank change within a bucket reuses the compiled kernel. down: the row stride of out [M, r];
# wgrad: the row stride of u [M, r] and the strides of the fp32 partials [SPLIT_M, P, r].
@triton.jit(do_not_specialize=["rank", "seed", "stride_om"])
def _lora_down_kernel(
    # pointers
    a_ptr, b_ptr, out_ptr,
    # sizes and scalars
    M, K, rank, p, seed,
    # strides
    stride_am, stride_ak, stride_bk, stride_br, stride_om, stride_or,
    # constexpr
    DROP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """out[M, r] = drop(a)[M, K] b[K, r]; program (i, j) owns rows i*BLOCK_M.. and ranks j*BLOCK_R..

    With DROP, a is multiplied by the dropout multiplier of its element (m, k) of [M, K]."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    r_ok = offs_r < rank
    rows = offs_m.to(tl.int64)  # int64 addresses: m * stride_am wraps in int32 past 2**31 elements
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + offs_k
        k_ok = ks < K
        a = tl.load(a_ptr + rows[:, None] * stride_am + ks[None, :] * stride_ak,
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)  # (BM, BK)
        if DROP:
            mult = dropout_multiplier(seed, offs_m[:, None], ks[None, :], K, p)
            a = downcast(a.to(tl.float32) * mult, a.dtype, PRECISION)
        b = tl.load(b_ptr + ks[:, None] * stride_bk + offs_r[None, :] * stride_br,
                    mask=k_ok[:, None] & r_ok[None, :], other=0.0)  # (BK, R)
        acc = mma(a, b, acc, PRECISION)
    out = out_ptr + rows[:, None] * stride_om + offs_r[None, :] * stride_or
    tl.store(out, downcast(acc, out_ptr.dtype.element_ty, PRECISION), mask=m_ok[:, None] & r_ok[None, :])


@triton.jit(do_not_specialize=["rank", "seed", "stride_um", "stride_os", "stride_op"])
def _lora_wgrad_kernel(
    # pointers
    a_ptr, u_ptr, out_ptr, colsum_ptr,
    # sizes and scalars
    M, P, rank, scaling, p, seed, rows_per_split,
    # strides
    stride_am, stride_ap, stride_um, stride_ur, stride_os, stride_op, stride_or, stride_cs,
    # constexpr
    DROP: tl.constexpr, COLSUM: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
):
    """out[s, P, r] = scaling * sum over rows m of split s of drop(a)[m, P]^T u[m, r].

    Program (i, j, s): columns i*BLOCK_P.. of a, ranks j*BLOCK_R.., rows
    [s*rows_per_split, (s+1)*rows_per_split). COLSUM: colsum[s, P] = sum of those rows of a
    (undropped; written by the j == 0 programs)."""
    pid_r = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    p_ok = offs_p < P
    r_ok = offs_r < rank
    m_start = pid_s * rows_per_split
    m_end = tl.minimum(M, m_start + rows_per_split)
    acc = tl.zeros((BLOCK_P, BLOCK_R), dtype=tl.float32)
    csum = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        ms = m0 + tl.arange(0, BLOCK_M)
        m_ok = ms < m_end
        rows = ms.to(tl.int64)  # int64 addresses: m * stride_am wraps in int32 past 2**31 elements
        at = tl.load(a_ptr + offs_p[:, None] * stride_ap + rows[None, :] * stride_am,
                     mask=p_ok[:, None] & m_ok[None, :], other=0.0)  # (BP, BM): a^T tile
        if COLSUM:
            csum += tl.sum(at.to(tl.float32), axis=1)
        if DROP:
            mult = dropout_multiplier(seed, ms[None, :], offs_p[:, None], P, p)  # (BP, BM)
            at = downcast(at.to(tl.float32) * mult, at.dtype, PRECISION)
        u = tl.load(u_ptr + rows[:, None] * stride_um + offs_r[None, :] * stride_ur,
                    mask=m_ok[:, None] & r_ok[None, :], other=0.0)  # (BM, R)
        acc = mma(at, u, acc, PRECISION)
    out = out_ptr + pid_s * stride_os + offs_p[:, None] * stride_op + offs_r[None, :] * stride_or
    tl.store(out, downcast(acc * scaling, out_ptr.dtype.element_ty, PRECISION), mask=p_ok[:, None] & r_ok[None, :])
    if COLSUM:
        if pid_r == 0:
            csum_out = downcast(csum, colsum_ptr.dtype.element_ty, PRECISION)
            tl.store(colsum_ptr + pid_s * stride_cs + offs_p, csum_out, mask=p_ok)


# ------------------------------------------------------------------------------ launchers
def lora_down(a: torch.Tensor, b: torch.Tensor, rank: int, dropout_p: float = 0.0, seed: int = 0) -> torch.Tensor:
    """``drop(a) b`` for a [M, K] and b [K, r] (logical views, any strides) -> [M, r] in a's dtype."""
    seed, dropout_p = checked_seed("lora_down", seed), checked_dropout_p("lora_down", dropout_p)
    M, K = a.shape
    if b.shape != (K, rank):
        raise ValueError(f"lora_down: a is {tuple(a.shape)}, b is {tuple(b.shape)}, rank {rank}")
    out = torch.empty((M, rank), dtype=a.dtype, device=a.device)
    if M == 0 or rank == 0:
        return out
    block_r = config.rank_bucket(rank)
    cfg = config.down_config(M, K, block_r, a.dtype, a.device)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(rank, block_r))
    _lora_down_kernel[grid](
        a, b, out,
        M, K, rank, float(dropout_p), seed,
        *a.stride(), *b.stride(), *out.stride(),
        DROP=dropout_p > 0.0, BLOCK_R=block_r, PRECISION=config.input_precision(a.dtype), **cfg)
    return out


def lora_wgrad(a: torch.Tensor, u: torch.Tensor, scaling: float, out: torch.Tensor, *,
               dropout_p: float = 0.0, seed: int = 0, colsum_out: torch.Tensor | None = None) -> None:
    """Write ``scaling * drop(a)^T u`` into ``out`` [P, r] (a view, e.g. the active slice of a
    zero-initialised pool gradient) for a [M, P], u [M, r]; with ``colsum_out`` [P] also write
    the column sums of a (undropped) there."""
    seed, dropout_p = checked_seed("lora_wgrad", seed), checked_dropout_p("lora_wgrad", dropout_p)
    M, P = a.shape
    rank = u.shape[1]
    if u.shape[0] != M or out.shape != (P, rank) or (colsum_out is not None and colsum_out.shape != (P,)):
        raise ValueError(f"lora_wgrad: a {tuple(a.shape)}, u {tuple(u.shape)}, out {tuple(out.shape)}")
    if P == 0 or (rank == 0 and colsum_out is None):
        return
    if M == 0:
        out.zero_()
        if colsum_out is not None:
            colsum_out.zero_()
        return
    block_r = config.rank_bucket(rank)
    cfg = config.wgrad_config(P, M, block_r, a.dtype, a.device)
    split = cfg.pop("SPLIT_M")
    rows_per_split = triton.cdiv(triton.cdiv(M, split), cfg["BLOCK_M"]) * cfg["BLOCK_M"]
    split = triton.cdiv(M, rows_per_split)
    if split == 1:
        target, csum = out.unsqueeze(0), (colsum_out.unsqueeze(0) if colsum_out is not None else None)
    else:  # deterministic fp32 partials, summed below
        target = torch.empty((split, P, rank), dtype=torch.float32, device=a.device)
        csum = torch.empty((split, P), dtype=torch.float32, device=a.device) if colsum_out is not None else None
    cs = csum if csum is not None else target
    grid = (triton.cdiv(P, cfg["BLOCK_P"]), max(1, triton.cdiv(rank, block_r)), split)
    _lora_wgrad_kernel[grid](
        a, u, target, cs,
        M, P, rank, float(scaling), float(dropout_p), seed, rows_per_split,
        *a.stride(), *u.stride(), *target.stride(), cs.stride(0),
        DROP=dropout_p > 0.0, COLSUM=colsum_out is not None, BLOCK_R=block_r,
        PRECISION=config.input_precision(a.dtype), **cfg)
    if split > 1:
        out.copy_(target.sum(0))
        if colsum_out is not None:
            colsum_out.copy_(csum.sum(0))
