"""The fused GEMM with a LoRA epilogue: the forward ``y`` and the backward ``dX`` (and ``dW``).

    out[M, N] = a[M, K] b[K, N] (+ bias[N]) + s * drop_mn( u[M, r] v[r, N] )

Forward (p = 0): a = x, b = W^T, v = B_r^T, and u = t = x A_r^T is computed inside the main
K-loop from the x tile already loaded (``d = A_r^T`` [K, r], one extra [BLOCK_M, BLOCK_R] MMA per
K-step: r/BLOCK_N more tensor-core work, no extra pass over x). The tile column pid_n == 0 writes
t for the backward. Forward (p > 0): t = drop(x) A_r^T comes from ``lora_skinny.lora_down`` and is
passed as u (one extra K-step over [t, s B_r] in the epilogue).

Backward dX: a = dY, b = W, d = B_r (so u = t' = dY B_r, computed in the dY loop and written for
dA), v = A_r, and with dropout the LoRA term is multiplied by the forward's mask at (m, k).
dW = dY^T x is the same kernel without LoRA.

Rank handling: BLOCK_R is a bucket (config.rank_bucket); pool slots >= r are never read (masked
loads, or a TMA descriptor whose shape stops at r); ranks above 128 loop over r in chunks.

Two kernels share this math: a portable pointer-load kernel (every GPU, and the interpreter) and a
persistent kernel over host TMA descriptors (Hopper; docs/performance.md: pointer loads measured at 73 % of
cuBLAS there and TMA + persistent at 90-100 %). ``lora_gemm`` picks TMA only when
``config.want_tma`` says so and every hot-loop operand is descriptor-compatible.
"""

# (no `from __future__ import annotations`: kernels keep real tl.constexpr annotations)

import warnings

import torch
import triton
import triton.language as tl

from lorambo_kernels import config
from lorambo_kernels.common import downcast, mma
from lorambo_kernels.dropout import dropout_multiplier
from lorambo_kernels.arguments import checked_dropout_p, checked_seed

try:  # host-side TMA descriptors: triton >= 3.4
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older triton: pointer path only
    TensorDescriptor = None

try:
    from triton.compiler.errors import CompilationError
    from triton.runtime.errors import OutOfResources

    _TMA_BUILD_ERRORS = (CompilationError, OutOfResources)
except ImportError:  # pragma: no cover
    _TMA_BUILD_ERRORS = ()

# Run-time ints whose value follows the rank: the rank itself, the row strides of the [M, r]
# buffers u and u_out (t, t' and the written-out t), and the seed (random). Triton would otherwise
# specialise them on their value (== 1 -> constexpr, multiple of 16 -> divisibility hint) and
# compile a new variant at rank 1, at each multiple of 16 and for the other ranks, instead of
# one per rank bucket (tests/kernels/test_rank_specialization.py checks the launch keys).
# The cost: the epilogue's [BLOCK_M, BLOCK_R] loads/stores of u lose the row-alignment hint.
RANK_DEPENDENT = ["rank", "seed", "stride_um", "stride_uom"]

# Set (with a one-time warning) when the TMA kernel fails to compile or fit on this GPU/triton;
# the pointer kernel then runs instead. A safety net for the fast path, whose build only a run
# on that GPU and triton version proves; the warning says why it was dropped.
_tma_disabled: str | None = None


@triton.jit
def _tile_ids(tile_id, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped tile order: GROUP_M row tiles share each B column tile while it is in L2."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * num_pid_n
    first_m = (tile_id // in_group) * GROUP_M
    group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (tile_id % in_group) % group_size
    pid_n = (tile_id % in_group) // group_size
    return pid_m, pid_n


@triton.jit
def _lora_epilogue(acc, u_acc, offs_m, offs_n, pid_n,
                   bias_ptr, u_ptr, v_ptr, out_ptr, u_out_ptr,
                   M, N, rank, scaling, p, seed,
                   stride_um, stride_ur, stride_vr, stride_vn, stride_om, stride_on, stride_uom, stride_uor,
                   HAS_BIAS: tl.constexpr, LORA: tl.constexpr, LORA_ACC: tl.constexpr, DROP_OUT: tl.constexpr,
                   WRITE_U: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                   PRECISION: tl.constexpr):
    """The LoRA K-step over [u, v], the dropout multiplier, bias, the store (shared by both kernels).

    LORA_ACC: the LoRA product gets its own [BLOCK_M, BLOCK_N] accumulator (needed for the
    elementwise dropout multiplier, and when the scaling is too extreme to fold). Otherwise it
    is folded into the main one, ``acc = s * (acc / s + u v)``, which saves the registers of a
    second tile accumulator at the cost of ~1 fp32 ulp."""
    m_ok = offs_m < M  # (BM,)
    n_ok = offs_n < N  # (BN,)
    # int64 row/column indices for the addresses: m * stride passes 2**31 on outputs of more than
    # 2**31 elements (and on inputs of rows that far apart), where int32 products wrap around
    rows = offs_m.to(tl.int64)
    cols = offs_n.to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    if LORA != 0:
        if LORA_ACC:
            lora = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        else:
            lora = acc * (1.0 / scaling)
        if LORA == 2:
            u = downcast(u_acc, v_ptr.dtype.element_ty, PRECISION)  # (BM, R): t rounded like the reference's x A^T
            if WRITE_U:
                if pid_n == 0:
                    u_out = u_out_ptr + rows[:, None] * stride_uom + offs_r[None, :] * stride_uor
                    tl.store(u_out, u, mask=m_ok[:, None] & (offs_r[None, :] < rank))
            v = tl.load(v_ptr + offs_r[:, None] * stride_vr + cols[None, :] * stride_vn,
                        mask=(offs_r[:, None] < rank) & n_ok[None, :], other=0.0)  # (R, BN)
            lora = mma(u, v, lora, PRECISION)
        else:
            # The rank bounds the loop: padded slots are skipped. num_stages=1: not software-pipelined
            # (1-2 trips); pipelined at the kernel's num_stages it multi-buffers the [BM, R] and
            # [R, BN] tiles in shared memory: 256-384 KiB at fp32, R = 128 (sm_90 AOT compile).
            for r0 in tl.range(0, rank, BLOCK_R, num_stages=1):
                rr = r0 + offs_r
                u = tl.load(u_ptr + rows[:, None] * stride_um + rr[None, :] * stride_ur,
                            mask=m_ok[:, None] & (rr[None, :] < rank), other=0.0)  # (BM, R)
                v = tl.load(v_ptr + rr[:, None] * stride_vr + cols[None, :] * stride_vn,
                            mask=(rr[:, None] < rank) & n_ok[None, :], other=0.0)  # (R, BN)
                lora = mma(u, v, lora, PRECISION)
        if LORA_ACC:
            if DROP_OUT:
                lora = lora * dropout_multiplier(seed, offs_m[:, None], offs_n[None, :], N, p)
            acc += scaling * lora
        else:
            acc = lora * scaling
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on
    tl.store(out, downcast(acc, out_ptr.dtype.element_ty, PRECISION), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit(do_not_specialize=RANK_DEPENDENT)
def _lora_gemm_kernel(
    # pointers
    a_ptr, b_ptr, d_ptr, bias_ptr, u_ptr, v_ptr, out_ptr, u_out_ptr,
    # sizes and scalars
    M, N, K, rank, scaling, p, seed,
    # strides
    stride_am, stride_ak, stride_bk, stride_bn, stride_dk, stride_dr,
    stride_um, stride_ur, stride_vr, stride_vn, stride_om, stride_on, stride_uom, stride_uor,
    # constexpr
    HAS_BIAS: tl.constexpr, LORA: tl.constexpr, LORA_ACC: tl.constexpr, DROP_OUT: tl.constexpr, WRITE_U: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, PRECISION: tl.constexpr,
):
    """Pointer-load kernel, one program per [BLOCK_M, BLOCK_N] tile of out [M, N].

    LORA: 0 = no LoRA term; 1 = u [M, r] given; 2 = u = a d computed in the K-loop (d [K, r],
    r <= BLOCK_R), stored to u_out [M, r] when WRITE_U. DROP_OUT multiplies the LoRA term by the
    dropout multiplier of element (m, n) of an [M, N] tensor.
    """
    pid_m, pid_n = _tile_ids(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    # Rows/cols past the edge wrap (modulo) instead of being masked: the loads stay unmasked
    # along M and N, and the wrapped results are dropped by the store mask.
    rows = (offs_m % M).to(tl.int64)  # int64 addresses: see _lora_epilogue
    cols = (offs_n % N).to(tl.int64)
    a_ptrs = a_ptr + rows[:, None] * stride_am + offs_k[None, :] * stride_ak  # (BM, BK)
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + cols[None, :] * stride_bn  # (BK, BN)
    d_ptrs = d_ptr + offs_k[:, None] * stride_dk + offs_r[None, :] * stride_dr  # (BK, R)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    u_acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + offs_k) < K
        a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None], other=0.0)
        acc = mma(a, b, acc, PRECISION)
        if LORA == 2:
            d = tl.load(d_ptrs, mask=k_ok[:, None] & (offs_r[None, :] < rank), other=0.0)
            u_acc = mma(a, d, u_acc, PRECISION)
            d_ptrs += BLOCK_K * stride_dk
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    _lora_epilogue(acc, u_acc, offs_m, offs_n, pid_n, bias_ptr, u_ptr, v_ptr, out_ptr, u_out_ptr,
                   M, N, rank, scaling, p, seed,
                   stride_um, stride_ur, stride_vr, stride_vn, stride_om, stride_on, stride_uom, stride_uor,
                   HAS_BIAS, LORA, LORA_ACC, DROP_OUT, WRITE_U, BLOCK_M, BLOCK_N, BLOCK_R, PRECISION)


@triton.jit
def _desc_tile(desc, off_row, off_col, TRANS: tl.constexpr):
    """The [rows, cols] tile at (off_row, off_col) of a logical operand whose descriptor covers
    either the operand itself or (TRANS) its transpose."""
    if TRANS:
        tile = tl.trans(desc.load([off_col, off_row]))
    else:
        tile = desc.load([off_row, off_col])
    return tile


@triton.jit(do_not_specialize=RANK_DEPENDENT)
def _lora_gemm_tma_kernel(
    # descriptors and pointers
    a_desc, b_desc, d_desc, bias_ptr, u_ptr, v_ptr, out_ptr, u_out_ptr,
    # sizes and scalars
    M, N, K, rank, scaling, p, seed,
    # strides
    stride_um, stride_ur, stride_vr, stride_vn, stride_om, stride_on, stride_uom, stride_uor,
    # constexpr
    A_T: tl.constexpr, B_T: tl.constexpr, D_T: tl.constexpr,
    HAS_BIAS: tl.constexpr, LORA: tl.constexpr, LORA_ACC: tl.constexpr, DROP_OUT: tl.constexpr, WRITE_U: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, PRECISION: tl.constexpr,
):
    """Persistent kernel: one program per SM walks the tiles of out [M, N] (stride: the grid size,
    a run-time value, so small M does not compile new variants); the hot-loop operands
    a [M, K], b [K, N] and d [K, r] come through TMA descriptors (zero padding past the edges,
    and d's descriptor stops at r, so inactive pool slots are never read). X_T: the descriptor
    covers the transpose of the logical operand X. Same epilogue as the pointer kernel."""
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    for tile_id in range(tl.program_id(0), num_tiles, tl.num_programs(0)):
        pid_m, pid_n = _tile_ids(tile_id, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        u_acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            a = _desc_tile(a_desc, off_m, k0, A_T)  # (BM, BK)
            b = _desc_tile(b_desc, k0, off_n, B_T)  # (BK, BN)
            acc = mma(a, b, acc, PRECISION)
            if LORA == 2:
                d = _desc_tile(d_desc, k0, 0, D_T)  # (BK, R)
                u_acc = mma(a, d, u_acc, PRECISION)
        offs_m = off_m + tl.arange(0, BLOCK_M)
        offs_n = off_n + tl.arange(0, BLOCK_N)
        _lora_epilogue(acc, u_acc, offs_m, offs_n, pid_n, bias_ptr, u_ptr, v_ptr, out_ptr, u_out_ptr,
                       M, N, rank, scaling, p, seed,
                       stride_um, stride_ur, stride_vr, stride_vn, stride_om, stride_on, stride_uom, stride_uor,
                       HAS_BIAS, LORA, LORA_ACC, DROP_OUT, WRITE_U, BLOCK_M, BLOCK_N, BLOCK_R, PRECISION)


# ------------------------------------------------------------------------------- launcher
def _descriptor(t: torch.Tensor, block: tuple[int, int]):
    """(descriptor, transposed) for a logical 2-D operand, or None when TMA cannot address it
    (needs one unit stride, 16-byte aligned base and other stride)."""
    trans = t.stride(1) != 1
    base = t.t() if trans else t
    if base.stride(1) != 1 or base.data_ptr() % 16 or (base.stride(0) * base.element_size()) % 16:
        return None
    if min(base.shape) == 0:
        return None
    box = [block[1], block[0]] if trans else list(block)
    return TensorDescriptor(base, list(base.shape), list(base.stride()), box), trans


def lora_gemm(a, b, bias=None, *, rank=0, scaling=1.0, u=None, d=None, v=None, write_u=False,
              dropout_p=0.0, seed=0, out_dtype=None):
    """``out = a b (+ bias) + scaling * drop(u v)`` with u either given or computed as ``a d``.

    a: [M, K], b: [K, N] (logical 2-D views: any strides, e.g. ``W.t()``), bias: [N] (any stride) or None.
    LoRA term (rank > 0): v [r, N] with either u [M, r] or d [K, r] (then u = a d, rank <= 128,
    returned as [M, r] when ``write_u``). dropout_p > 0 multiplies the LoRA term by the
    dropout multiplier of element (m, n) of an [M, N] tensor drawn from ``seed``.
    Returns (out [M, N], u_out [M, r] or None).
    """
    seed, dropout_p = checked_seed("lora_gemm", seed), checked_dropout_p("lora_gemm", dropout_p)
    M, K = a.shape
    N = b.shape[1]
    if b.shape[0] != K:
        raise ValueError(f"lora_gemm: a is {tuple(a.shape)} but b is {tuple(b.shape)}")
    lora = 0 if rank == 0 else (2 if d is not None else 1)
    if lora == 2 and rank > config.MAX_BLOCK_R:
        raise ValueError(f"lora_gemm: the fused down-projection needs rank <= {config.MAX_BLOCK_R}, got {rank}")
    if lora and (v is None or (lora == 1 and u is None) or v.shape != (rank, N)):
        raise ValueError("lora_gemm: a LoRA term needs v [rank, N] and u [M, rank] or d [K, rank]")
    out = torch.empty((M, N), dtype=out_dtype or a.dtype, device=a.device)
    u_out = torch.empty((M, rank), dtype=a.dtype, device=a.device) if (lora == 2 and write_u) else None
    if M == 0 or N == 0:
        return out, u_out
    block_r = config.rank_bucket(rank)
    precision = config.input_precision(a.dtype)
    dummy = out
    u_, d_, v_ = (u if u is not None else dummy), (d if d is not None else dummy), (v if v is not None else dummy)
    uo = u_out if u_out is not None else dummy
    drop_out = lora != 0 and dropout_p > 0.0
    # Fold the LoRA product into the main accumulator unless a dropout mask must multiply it
    # alone, or 1/scaling could overflow/lose the base product (|s| outside [1e-4, 1e4]).
    fold = not drop_out and 1e-4 <= abs(scaling) <= 1e4
    lora_acc = lora != 0 and not fold  # a second tile accumulator: the block shapes make room for it
    flags = dict(HAS_BIAS=bias is not None, LORA=lora, LORA_ACC=not fold, DROP_OUT=drop_out,
                 WRITE_U=u_out is not None, BLOCK_R=block_r, PRECISION=precision)
    scalars = (M, N, K, rank, float(scaling), float(dropout_p), seed)
    tail_strides = (*_strides(u_), *_strides(v_), *out.stride(), *_strides(uo))
    bias_ = bias.contiguous() if bias is not None else dummy  # the epilogue loads it with unit stride

    global _tma_disabled
    if K > 0 and _tma_disabled is None and TensorDescriptor is not None and config.want_tma(a.device):
        cfg = config.tma_gemm_config(M, N, K, block_r, a.dtype, a.device, lora_acc=lora_acc)
        bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
        da = _descriptor(a, (bm, bk))
        db = _descriptor(b, (bk, bn))
        dd = _descriptor(d, (bk, block_r)) if lora == 2 else da
        if da is not None and db is not None and dd is not None:
            tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
            try:
                _lora_gemm_tma_kernel[(min(config.sm_count(a.device), tiles),)](
                    da[0], db[0], dd[0], bias_, u_, v_, out, uo,
                    *scalars, *tail_strides,
                    A_T=da[1], B_T=db[1], D_T=dd[1], **flags, **cfg)
                return out, u_out
            except _TMA_BUILD_ERRORS as err:
                _tma_disabled = f"{type(err).__name__}: {err}"
                warnings.warn(f"lorambo_kernels: the TMA GEMM failed to build here, using the pointer-load "
                              f"kernel from now on ({_tma_disabled[:500]})", RuntimeWarning, stacklevel=2)

    cfg = config.gemm_config(M, N, K, block_r, a.dtype, a.device, lora_acc=lora_acc)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
    _lora_gemm_kernel[grid](
        a, b, d_, bias_, u_, v_, out, uo,
        *scalars,
        *a.stride(), *b.stride(), *_strides(d_), *tail_strides,
        **flags, **cfg)
    return out, u_out


def _strides(t: torch.Tensor) -> tuple[int, int]:
    """Two strides of a 2-D operand (the 1-D dummy passed for an absent operand gives (1, 1))."""
    return (t.stride(0), t.stride(1)) if t.dim() == 2 else (1, 1)
