"""Grouped sketch kernels: per-layer statistics of many layers in one launch.

Each launch covers many layers of different sizes through int64 tables of data pointers, sizes
and strides (one row per layer or per captured call of a layer) and a grid over (tile, row) in
which programs past the end of their row's work exit at once. Results go to flat fp32 buffers
(one region per layer), so a distributed caller reduces all layers with one collective.

    sketch_project   S_e[T_e, p] = A_e[T_e, n_e] V_l[n_e, p]          (entries e of layer l)
    sketch_reduce    Y_l[m_l, p] = sum_{e of layer l} B_e[T_e, m_l]^T S_e[T_e, p]
                     With (A, B) = (X, dY): Y_l = G_l V_l for G_l = sum_e dY_e^T X_e (range
                     sketch); with (A, B) = (dY, X): Y_l = G_l^T U_l (co-range sketch). G_l is
                     never formed: O(T p (n + m)) per layer instead of O(T n m).
    gram_sq_norms    ||dY_n^T X_n||_F^2 = <X_n X_n^T, dY_n dY_n^T> per example n (Gram trick)
    row_dots         <x_l[p], y_l[p]> and ||x_l[p]||^2 per layer l and row p

V_l is either an explicit fp32 matrix (a region of a flat buffer) or a Gaussian probe generated
in the kernel: entry (j, c) of layer l's probe is ``tl.randn(seed_l, c * n_l + j)`` (Philox), so
column c does not depend on how many columns are drawn and the probe is never stored;
:func:`gaussian_probe` materialises it for tests.
"""

# (no `from __future__ import annotations`: kernels keep real tl.constexpr annotations)

import torch
import triton
import triton.language as tl

from lorambo_kernels.common import mma
from lorambo_kernels.config import input_precision, is_interpreter
from lorambo_kernels.grid import cuda_grid
from lorambo_kernels.arguments import checked_seed

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
SUPPORTED_DTYPES = tuple(_TL_DTYPES)

# Entry table (one row per captured (X, dY) call), int64 columns:
E_X, E_DY, E_T, E_LAYER, E_SXT, E_SXN, E_SDT, E_SDM, E_S_OFF = range(9)
ENTRY_WIDTH = 9
# Layer table (one row per layer), int64 columns: the entries of layer l are rows
# [L_FIRST, L_END) of the entry table; its V / Y regions start at L_IN_OFF (in * p elements)
# and L_OUT_OFF (out * p elements) of the flat buffers; L_P columns of p are used (<= p).
L_FIRST, L_END, L_IN, L_OUT, L_IN_OFF, L_OUT_OFF, L_SEED, L_P = range(8)
LAYER_WIDTH = 8


@triton.jit
def _probe_tile(seed, rows, cols, n_rows, n_cols):
    """Gaussian probe entries (rows [BN, 1], cols [1, BP]) of an [n_rows, n_cols] probe; 0 outside."""
    offs = cols.to(tl.int64) * n_rows + rows.to(tl.int64)
    return tl.where((rows < n_rows) & (cols < n_cols), tl.randn(seed, offs), 0.0)


@triton.jit
def _sketch_project_kernel(
    # pointers
    entries_ptr, layers_ptr, v_ptr, s_ptr,
    # sizes
    p,
    # constexpr
    ADJOINT: tl.constexpr, GENERATED: tl.constexpr, DTYPE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, PRECISION: tl.constexpr,
):
    """S_e[T_e, p] = A_e V_l; program (i, e) owns rows i*BLOCK_T.. of entry e (token tiles on
    grid axis 0, the only one CUDA lets past 65535 programs).

    A_e = X_e [T, in] (ADJOINT False) or dY_e [T, out]; V_l is [n, p] row-major at the layer's
    region of v (or generated from its seed with GENERATED); S_e row-major with row stride p."""
    e = tl.program_id(1)
    entry = entries_ptr + e * 9
    T = tl.load(entry + 2)
    if tl.program_id(0) * BLOCK_T < T:
        layer = layers_ptr + tl.load(entry + 3) * 8
        if ADJOINT:
            a_ptr = tl.load(entry + 1).to(tl.pointer_type(DTYPE))
            stride_at = tl.load(entry + 6)
            stride_an = tl.load(entry + 7)
            n = tl.load(layer + 3)
            v_off = tl.load(layer + 5)
        else:
            a_ptr = tl.load(entry + 0).to(tl.pointer_type(DTYPE))
            stride_at = tl.load(entry + 4)
            stride_an = tl.load(entry + 5)
            n = tl.load(layer + 2)
            v_off = tl.load(layer + 4)
        seed = tl.load(layer + 6)
        p_used = tl.load(layer + 7)
        offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        offs_p = tl.arange(0, BLOCK_P)
        t_ok = offs_t < T
        acc = tl.zeros((BLOCK_T, BLOCK_P), dtype=tl.float32)
        for n0 in range(0, n, BLOCK_N):
            ns = n0 + tl.arange(0, BLOCK_N)
            n_ok = ns < n
            a = tl.load(a_ptr + offs_t[:, None] * stride_at + ns[None, :] * stride_an,
                        mask=t_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)  # (BT, BN)
            if GENERATED:
                v = _probe_tile(seed, ns[:, None], offs_p[None, :], n, p_used)  # (BN, BP)
            else:
                v = tl.load(v_ptr + v_off + ns[:, None] * p + offs_p[None, :],
                            mask=n_ok[:, None] & (offs_p[None, :] < p_used), other=0.0)
            acc = tl.dot(a, v, acc, input_precision=PRECISION)
        s_off = tl.load(entry + 8)
        # int64 rows: an entry of T tokens spans T * p elements of S, past int32 beyond 2^31
        tl.store(s_ptr + s_off + offs_t.to(tl.int64)[:, None] * p + offs_p[None, :], acc,
                 mask=t_ok[:, None] & (offs_p[None, :] < p))


@triton.jit
def _sketch_reduce_kernel(
    # pointers
    entries_ptr, layers_ptr, s_ptr, y_ptr,
    # sizes
    p,
    # constexpr
    ADJOINT: tl.constexpr, DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr, PRECISION: tl.constexpr,
):
    """Y_l[m, p] = sum over entries e of layer l of B_e^T S_e; program (l, i) owns rows i*BLOCK_M..

    B_e = dY_e [T, out] (ADJOINT False) or X_e [T, in]. One program sums all tokens of all
    entries of its rows in a fixed order: deterministic, no atomics."""
    layer = layers_ptr + tl.program_id(0) * 8
    if ADJOINT:
        m = tl.load(layer + 2)
        y_off = tl.load(layer + 4)
    else:
        m = tl.load(layer + 3)
        y_off = tl.load(layer + 5)
    if tl.program_id(1) * BLOCK_M < m:
        offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_p = tl.arange(0, BLOCK_P)
        m_ok = offs_m < m
        p_ok = offs_p < p
        acc = tl.zeros((BLOCK_M, BLOCK_P), dtype=tl.float32)
        for e in range(tl.load(layer + 0), tl.load(layer + 1)):
            entry = entries_ptr + e * 9
            T = tl.load(entry + 2)
            s_off = tl.load(entry + 8)
            if ADJOINT:
                b_ptr = tl.load(entry + 0).to(tl.pointer_type(DTYPE))
                stride_bt = tl.load(entry + 4)
                stride_bm = tl.load(entry + 5)
            else:
                b_ptr = tl.load(entry + 1).to(tl.pointer_type(DTYPE))
                stride_bt = tl.load(entry + 6)
                stride_bm = tl.load(entry + 7)
            for t0 in range(0, T, BLOCK_T):
                ts = t0 + tl.arange(0, BLOCK_T)
                t_ok = ts < T
                bt = tl.load(b_ptr + offs_m[:, None] * stride_bm + ts[None, :] * stride_bt,
                             mask=m_ok[:, None] & t_ok[None, :], other=0.0).to(tl.float32)  # (BM, BT)
                s = tl.load(s_ptr + s_off + ts.to(tl.int64)[:, None] * p + offs_p[None, :],
                            mask=t_ok[:, None] & p_ok[None, :], other=0.0)  # (BT, BP)
                acc = tl.dot(bt, s, acc, input_precision=PRECISION)
        tl.store(y_ptr + y_off + offs_m[:, None] * p + offs_p[None, :], acc,
                 mask=m_ok[:, None] & p_ok[None, :])


@triton.jit
def _gram_kernel(
    # pointers
    table_ptr, out_ptr,
    # sizes
    n_tiles, out_stride_e, out_stride_b,
    # constexpr
    DTYPE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    """Partial sums of <X_n X_n^T, dY_n dY_n^T> over token tiles (ti, tj), ti <= tj.

    Program (ti * n_tiles + tj, e, n) of table row e (x, dy, B, T, in, out, 6 strides) writes
    its tile's sum (twice when ti < tj: the Gram matrices are symmetric) at out[e, n, tile]. The
    tiles, n_tiles**2 of them, go on grid axis 0: CUDA caps axes 1 and 2 at 65535 programs, which
    n_tiles**2 passes from 16k tokens per example on."""
    tile = tl.program_id(0)
    e = tl.program_id(1)
    n = tl.program_id(2)
    ti = tile // n_tiles
    tj = tile % n_tiles
    row = table_ptr + e * 12
    B = tl.load(row + 2)
    T = tl.load(row + 3)
    if (n < B) & (ti <= tj) & (tj * BLOCK_T < T):
        x_ptr = tl.load(row + 0).to(tl.pointer_type(DTYPE))
        dy_ptr = tl.load(row + 1).to(tl.pointer_type(DTYPE))
        d_in = tl.load(row + 4)
        d_out = tl.load(row + 5)
        x_ptr += n * tl.load(row + 6)
        dy_ptr += n * tl.load(row + 9)
        rows_i = ti * BLOCK_T + tl.arange(0, BLOCK_T)
        rows_j = tj * BLOCK_T + tl.arange(0, BLOCK_T)
        ok_i = rows_i < T
        ok_j = rows_j < T
        gx = _gram_tile(x_ptr, rows_i, rows_j, ok_i, ok_j, d_in, tl.load(row + 7), tl.load(row + 8),
                        BLOCK_T, BLOCK_D, PRECISION)
        gy = _gram_tile(dy_ptr, rows_i, rows_j, ok_i, ok_j, d_out, tl.load(row + 10), tl.load(row + 11),
                        BLOCK_T, BLOCK_D, PRECISION)
        total = tl.sum(tl.sum(gx * gy, axis=1), axis=0)
        total = tl.where(ti < tj, 2.0 * total, total)
        tl.store(out_ptr + e * out_stride_e + n * out_stride_b + tile, total)


@triton.jit
def _gram_tile(ptr, rows_i, rows_j, ok_i, ok_j, d, stride_t, stride_d,
               BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """(rows_i of M) (rows_j of M)^T for M [T, d] at ptr: a [BLOCK_T, BLOCK_T] fp32 tile."""
    acc = tl.zeros((BLOCK_T, BLOCK_T), dtype=tl.float32)
    for d0 in range(0, d, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        d_ok = ds < d
        a = tl.load(ptr + rows_i[:, None] * stride_t + ds[None, :] * stride_d,
                    mask=ok_i[:, None] & d_ok[None, :], other=0.0)  # (BT, BD)
        bt = tl.load(ptr + rows_j[None, :] * stride_t + ds[:, None] * stride_d,
                     mask=ok_j[None, :] & d_ok[:, None], other=0.0)  # (BD, BT)
        acc = mma(a, bt, acc, PRECISION)  # 16-bit products are exact in the fp32 accumulator
    return acc


@triton.jit
def _row_dots_kernel(
    # pointers
    table_ptr, out_ptr,
    # sizes
    out_stride_l, out_stride_p,
    # constexpr
    SQUARE: tl.constexpr, DTYPE: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr,
):
    """Partial <x_l[p], y_l[p]> (or ||x_l[p]||^2 with SQUARE) over chunk c of CHUNK * BLOCK
    elements; program (c, l, p) of table row l (x, y, N, P, row stride x, row stride y) writes
    out[l, p, c]. Rows are contiguous (unit element stride). The chunks go on grid axis 0 (CUDA
    caps axes 1 and 2 at 65535 programs: rows of 2**30 elements and more), and element offsets
    are int64 (rows past 2**31 elements: a large LM head's gradient)."""
    chunk = tl.program_id(0)
    l = tl.program_id(1)
    row = table_ptr + l * 6
    N = tl.load(row + 2)
    P = tl.load(row + 3)
    pid_p = tl.program_id(2)
    start = chunk.to(tl.int64) * (BLOCK * CHUNK)
    if (pid_p < P) & (start < N):
        x_ptr = tl.load(row + 0).to(tl.pointer_type(DTYPE)) + pid_p * tl.load(row + 4)
        y_ptr = tl.load(row + 1).to(tl.pointer_type(DTYPE)) + pid_p * tl.load(row + 5)
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for i in range(CHUNK):
            offs = start + i * BLOCK + tl.arange(0, BLOCK)
            ok = offs < N
            x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
            if SQUARE:
                acc += x * x
            else:
                acc += x * tl.load(y_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + l * out_stride_l + pid_p * out_stride_p + chunk, tl.sum(acc, axis=0))


@triton.jit
def _probe_kernel(out_ptr, n, p, seed, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr):
    """out[n, p] (fp32, row-major) = the in-kernel Gaussian probe of ``seed``."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)[:, None]
    cols = tl.arange(0, BLOCK_P)[None, :]
    tl.store(out_ptr + rows * p + cols, _probe_tile(seed, rows, cols, n, p), mask=(rows < n) & (cols < p))


# ------------------------------------------------------------------------------ launchers
def sketch_config(kind: str, device: torch.device) -> dict:
    """Block shapes (pure function of the kind and device: no autotuning, graph-capturable).

    UNMEASURED on a GPU: the project / reduce loops are bandwidth bound skinny GEMMs (p <= 64
    columns), so 64-row tiles with wide reads; the interpreter gets small tiles so tiny test
    shapes span several programs, loop steps and partial blocks."""
    if is_interpreter():
        return {"project": dict(BLOCK_T=16, BLOCK_N=16), "reduce": dict(BLOCK_M=16, BLOCK_T=16),
                "gram": dict(BLOCK_T=16, BLOCK_D=16), "dots": dict(BLOCK=64, CHUNK=2)}[kind]
    return {"project": dict(BLOCK_T=64, BLOCK_N=64, num_warps=4, num_stages=3),
            "reduce": dict(BLOCK_M=64, BLOCK_T=64, num_warps=4, num_stages=3),
            "gram": dict(BLOCK_T=64, BLOCK_D=64, num_warps=4, num_stages=3),
            "dots": dict(BLOCK=1024, CHUNK=16, num_warps=4)}[kind]


def _tl_dtype(tensors, what: str):
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) != 1 or next(iter(dtypes)) not in _TL_DTYPES:
        raise ValueError(f"lorambo_kernels.sketch.{what}: all tensors must share one dtype of "
                         f"{SUPPORTED_DTYPES}, got {sorted(map(str, dtypes))}")
    return _TL_DTYPES[next(iter(dtypes))]


def _block_p(p: int) -> int:
    return max(16, triton.next_power_of_2(p))


class SketchGroup:
    """Tables and workspace of one grouped product ``G_l V_l`` / ``G_l^T U_l`` over many layers.

    xs[e] [T_e, in], dys[e] [T_e, out] are the captured calls (entries), ``layer_of[e]`` the
    layer of entry e (entries of a layer consecutive, layers numbered 0..L-1 in order, every
    layer with >= 1 entry); ``in_features`` / ``out_features`` [L]; ``p`` probe columns;
    ``p_used`` [L] columns actually used per layer (<= p, the rest stays 0); ``seeds`` [L] the
    Philox seeds of the generated probes. Flat buffers: V / Y regions of layer l are
    [in_l, p] / [out_l, p] row-major at ``in_offsets[l]`` / ``out_offsets[l]``.
    """

    def __init__(self, xs, dys, layer_of, in_features, out_features, p, p_used=None, seeds=None):
        if not xs or len(xs) != len(dys) or len(xs) != len(layer_of):
            raise ValueError(f"lorambo_kernels.sketch.SketchGroup: {len(xs)} inputs, {len(dys)} output "
                             f"gradients, {len(layer_of)} layer indices (need equal, >= 1)")
        n_layers = len(in_features)
        if list(layer_of) != sorted(layer_of) or sorted(set(layer_of)) != list(range(n_layers)):
            raise ValueError("lorambo_kernels.sketch.SketchGroup: layer_of must be sorted and cover "
                             f"layers 0..{n_layers - 1}, got {list(layer_of)}")
        if not 1 <= p <= 64:
            raise ValueError(f"lorambo_kernels.sketch.SketchGroup: p={p} probe columns (1..64 supported)")
        p_used = [p] * n_layers if p_used is None else [int(q) for q in p_used]
        seeds = [0] * n_layers if seeds is None else [checked_seed("lorambo_kernels.sketch.SketchGroup", s)
                                                      for s in seeds]
        # one row of the layer table per layer: a shorter list would leave the kernels reading
        # rows past the table's end (a segmentation fault under the interpreter)
        if not len(out_features) == len(p_used) == len(seeds) == n_layers:
            raise ValueError(f"lorambo_kernels.sketch.SketchGroup: {n_layers} in_features, {len(out_features)} "
                             f"out_features, {len(p_used)} p_used, {len(seeds)} seeds (need one of each per layer)")
        if not all(0 <= q <= p for q in p_used):
            raise ValueError(f"lorambo_kernels.sketch.SketchGroup: p_used {p_used} must be in [0, p={p}]")
        for e, (x, dy, l) in enumerate(zip(xs, dys, layer_of)):
            if (x.dim() != 2 or dy.dim() != 2 or x.shape[0] != dy.shape[0]
                    or x.shape[1] != in_features[l] or dy.shape[1] != out_features[l]):
                raise ValueError(f"lorambo_kernels.sketch.SketchGroup: entry {e} of layer {l}: x "
                                 f"{tuple(x.shape)}, dy {tuple(dy.shape)}, expected [T, {in_features[l]}] "
                                 f"and [T, {out_features[l]}]")
        self.dtype = _tl_dtype([*xs, *dys], "SketchGroup")
        self.device = xs[0].device
        self.xs, self.dys, self.p, self.n_layers = list(xs), list(dys), int(p), n_layers
        s_off, rows, pos = [], [], 0
        for x in xs:
            s_off.append(pos)
            pos += x.shape[0] * p
        self.s_numel = max(pos, 1)
        for x, dy, l, so in zip(xs, dys, layer_of, s_off):
            rows.append([x.data_ptr(), dy.data_ptr(), x.shape[0], l, *x.stride(), *dy.stride(), so])
        self.in_offsets, self.out_offsets = _offsets(in_features, p), _offsets(out_features, p)
        first = [list(layer_of).index(l) for l in range(n_layers)]
        end = first[1:] + [len(xs)]
        layers = [[f, t, i, o, io, oo, s, q] for f, t, i, o, io, oo, s, q in
                  zip(first, end, in_features, out_features, self.in_offsets[:-1], self.out_offsets[:-1],
                      seeds, p_used)]
        self.entries = torch.tensor(rows, dtype=torch.int64).to(self.device)
        self.layers = torch.tensor(layers, dtype=torch.int64).to(self.device)
        self.max_t = max(x.shape[0] for x in xs)
        self.max_in, self.max_out = max(in_features), max(out_features)

    def numel(self, adjoint: bool) -> int:
        """Size of the flat output of :meth:`apply` (sum of in_l * p or out_l * p)."""
        return self.in_offsets[-1] if adjoint else self.out_offsets[-1]

    def apply(self, v: torch.Tensor | None = None, adjoint: bool = False) -> torch.Tensor:
        """Flat fp32 Y: G_l V_l per layer (adjoint: G_l^T V_l), V from the flat fp32 ``v``
        (regions [in_l, p], adjoint [out_l, p]) or, with v None, the generated probes."""
        if v is not None and (v.dtype != torch.float32 or v.device != self.device or not v.is_contiguous()
                              or v.numel() != self.numel(not adjoint)):
            raise ValueError(f"lorambo_kernels.sketch.SketchGroup.apply: v must be a contiguous fp32 "
                             f"tensor of {self.numel(not adjoint)} elements on {self.device}, got "
                             f"{v.dtype} {tuple(v.shape)} on {v.device}")
        s = torch.empty(self.s_numel, dtype=torch.float32, device=self.device)
        y = torch.empty(self.numel(adjoint), dtype=torch.float32, device=self.device)
        prec = input_precision(torch.float32)
        cfg = sketch_config("project", self.device)
        grid = cuda_grid(triton.cdiv(self.max_t, cfg["BLOCK_T"]), len(self.xs), who="SketchGroup.apply")
        _sketch_project_kernel[grid](
            self.entries, self.layers, s if v is None else v, s,
            self.p,
            ADJOINT=adjoint, GENERATED=v is None, DTYPE=self.dtype, BLOCK_P=_block_p(self.p),
            PRECISION=prec, **cfg)
        cfg = sketch_config("reduce", self.device)
        grid = cuda_grid(self.n_layers, triton.cdiv(self.max_in if adjoint else self.max_out, cfg["BLOCK_M"]),
                         who="SketchGroup.apply")
        _sketch_reduce_kernel[grid](
            self.entries, self.layers, s, y,
            self.p,
            ADJOINT=adjoint, DTYPE=self.dtype, BLOCK_P=_block_p(self.p), PRECISION=prec, **cfg)
        return y


def _offsets(dims, p) -> list[int]:
    out, pos = [], 0
    for d in dims:
        out.append(pos)
        pos += int(d) * p
    return out + [pos]


def gram_sq_norms(xs, dys) -> list[torch.Tensor]:
    """||dY_n^T X_n||_F^2 per example for every pair: xs[e] [B_e, T_e, in_e], dys[e] [B_e, T_e, out_e]
    (any strides) -> [B_e] fp32 tensors, all from one launch (Gram trick, symmetric tiles once)."""
    if not xs or len(xs) != len(dys):
        raise ValueError(f"lorambo_kernels.sketch.gram_sq_norms: {len(xs)} inputs vs {len(dys)} gradients")
    for e, (x, dy) in enumerate(zip(xs, dys)):
        if x.dim() != 3 or dy.dim() != 3 or x.shape[:2] != dy.shape[:2]:
            raise ValueError(f"lorambo_kernels.sketch.gram_sq_norms: pair {e}: x {tuple(x.shape)}, "
                             f"dy {tuple(dy.shape)} (need [B, T, in] and [B, T, out])")
    dtype = _tl_dtype([*xs, *dys], "gram_sq_norms")
    device = xs[0].device
    cfg = sketch_config("gram", device)
    n_tiles = triton.cdiv(max(x.shape[1] for x in xs), cfg["BLOCK_T"])
    max_b = max(x.shape[0] for x in xs)
    table = torch.tensor([[x.data_ptr(), dy.data_ptr(), x.shape[0], x.shape[1], x.shape[2], dy.shape[2],
                           *x.stride(), *dy.stride()] for x, dy in zip(xs, dys)], dtype=torch.int64).to(device)
    out = torch.zeros((len(xs), max_b, n_tiles * n_tiles), dtype=torch.float32, device=device)
    if max_b > 0 and n_tiles > 0:
        grid = cuda_grid(n_tiles * n_tiles, len(xs), max_b, who="gram_sq_norms")
        _gram_kernel[grid](table, out, n_tiles, out.stride(0), out.stride(1), DTYPE=dtype,
                           PRECISION=input_precision(xs[0].dtype), **cfg)
    sums = out.sum(-1)
    return [sums[e, :x.shape[0]] for e, x in enumerate(xs)]


def row_dots(xs, ys=None) -> torch.Tensor:
    """fp64 [L, P_max]: entry (l, p) = <xs[l][p], ys[l][p]> (||xs[l][p]||^2 when ys is None) for
    tensors [P_l, ...] with contiguous rows, from one launch (fp32 partials of CHUNK * BLOCK
    elements, summed in fp64); entries p >= P_l are 0."""
    if ys is not None and (len(xs) != len(ys) or any(x.shape != y.shape for x, y in zip(xs, ys))):
        raise ValueError("lorambo_kernels.sketch.row_dots: xs and ys need equal lengths and shapes, got "
                         f"{[tuple(x.shape) for x in xs]} vs {[tuple(y.shape) for y in ys]}")
    if not xs:
        raise ValueError("lorambo_kernels.sketch.row_dots: no tensors")
    ys_ = xs if ys is None else ys
    for i, (x, y) in enumerate(zip(xs, ys_)):
        if x.dim() < 1 or not (x.is_contiguous() and y.is_contiguous()):
            raise ValueError(f"lorambo_kernels.sketch.row_dots: tensor {i} {tuple(x.shape)} must be "
                             "contiguous with at least one dim")
    dtype = _tl_dtype([*xs, *ys_], "row_dots")
    device = xs[0].device
    cfg = sketch_config("dots", device)
    span = cfg["BLOCK"] * cfg["CHUNK"]
    rows = [x.reshape(x.shape[0], -1) if x.dim() > 1 else x.view(1, -1) for x in xs]
    rows_y = [y.reshape(y.shape[0], -1) if y.dim() > 1 else y.view(1, -1) for y in ys_]
    table = torch.tensor([[x.data_ptr(), y.data_ptr(), x.shape[1], x.shape[0], x.stride(0), y.stride(0)]
                          for x, y in zip(rows, rows_y)], dtype=torch.int64).to(device)
    max_p = max(x.shape[0] for x in rows)
    chunks = max(1, triton.cdiv(max(x.shape[1] for x in rows), span))
    out = torch.zeros((len(rows), max_p, chunks), dtype=torch.float32, device=device)
    if max_p > 0:
        grid = cuda_grid(chunks, len(rows), max_p, who="row_dots")
        _row_dots_kernel[grid](table, out, out.stride(0), out.stride(1), SQUARE=ys is None, DTYPE=dtype, **cfg)
    return out.sum(-1, dtype=torch.float64)


def gaussian_probe(seed: int, n: int, p: int, device) -> torch.Tensor:
    """The probe [n, p] (fp32) that the sketch kernels generate in-kernel for ``seed``."""
    seed = checked_seed("lorambo_kernels.sketch.gaussian_probe", seed)
    if n < 0 or not 1 <= p <= 64:
        raise ValueError(f"lorambo_kernels.sketch.gaussian_probe: n={n}, p={p} (need n >= 0, 1 <= p <= 64)")
    out = torch.empty((n, p), dtype=torch.float32, device=device)
    if n:
        _probe_kernel[(triton.cdiv(n, 16),)](out, n, p, seed, BLOCK_N=16, BLOCK_P=_block_p(p))
    return out
