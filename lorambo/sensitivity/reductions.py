"""Per-layer reductions over all targeted layers at once, without a host sync per layer.

The sketches need, for every layer i and probe p, quadratic forms v_ip . (Hv)_ip and squared
norms. A Python loop that reduces each layer and copies it to the host costs L device syncs per
pass; here the per-layer sums stay on the device and are stacked, and the caller copies one
(P, L) tensor to the host. Three paths, all with at least fp32 accumulation and float64 results:

- the grouped Triton kernel (``lorambo.ops.sketch``: one launch for all layers) where
  :func:`lorambo.ops.sketch.use_sketch_kernels` says so (CUDA tensors by default);
- the compiled single-pass reductions of csrc/ where :func:`lorambo.ops.backend.use_compiled_multi_tensor`
  says so (the extension is built, CPU tensors): on the 2-core CPU they measured 2.6x (dots) and
  1.1x (squared norms, fp32) faster over 224 7B-shaped tensors (benchmarks/results/ext_cpu.md);
- otherwise a plain loop of products and sums in at least fp32 per layer, not ``torch._foreach_mul``:
  the same benchmark measured that 4.6x slower than a loop (212 ms against 46 ms), and it rounds
  bf16 products to bf16 before summing; benchmarks/bench_sketch.py compares them
  (benchmarks/results/sketch.csv: 80 against 156 ms for fp32 at 1 thread).
"""

from __future__ import annotations

import torch

from lorambo.ops.backend import use_compiled_multi_tensor
from lorambo.ops.sketch import row_dots, use_sketch_kernels

__all__ = ["per_layer_dots", "per_layer_sq_norms"]


def per_layer_dots(xs: list[torch.Tensor], ys: list[torch.Tensor]) -> torch.Tensor:
    """(P, L) float64: row p, column i = <xs[i][p], ys[i][p]>, for pairs of equal shape (P, ...)
    with one P for all; a 1-D (P,) tensor is P rows of one element. Every path takes the same
    inputs and refuses the others with the same ValueError."""
    _check_pairs(xs, ys)
    xs, ys = [_as_rows(x) for x in xs], [_as_rows(y) for y in ys]
    if not xs or xs[0].shape[0] == 0:  # (0, L) or (P, 0): the kernels and csrc take neither
        return torch.zeros(xs[0].shape[0] if xs else 0, len(xs), dtype=torch.float64,
                           device=xs[0].device if xs else None)
    if use_sketch_kernels([*xs, *ys]):
        return row_dots(xs, ys)
    if use_compiled_multi_tensor([*xs, *ys]):
        from lorambo.ext import ops as ext_ops

        return ext_ops.multi_dot(xs, ys, rows=xs[0].shape[0])
    return torch.stack([_row_dot(x, y) for x, y in zip(xs, ys)], dim=1)


def _check_pairs(xs: list[torch.Tensor], ys: list[torch.Tensor]) -> None:
    if len(xs) != len(ys):
        raise ValueError(f"per_layer_dots: {len(xs)} tensors vs {len(ys)}")
    for i, (x, y) in enumerate(zip(xs, ys)):
        if x.shape != y.shape:
            raise ValueError(f"per_layer_dots: xs[{i}] has shape {list(x.shape)} but ys[{i}] has shape "
                             f"{list(y.shape)}; pairs must have equal shapes")
        if x.dim() == 0:
            raise ValueError(f"per_layer_dots: xs[{i}] is 0-d; tensors need a leading dimension of P rows")
        if x.shape[0] != xs[0].shape[0]:
            raise ValueError(f"per_layer_dots: xs[{i}] has shape {list(x.shape)} but xs[0] has "
                             f"{xs[0].shape[0]} rows; every tensor needs the same leading dimension")


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    """(P, ...) as at least 2-D: (P,) is (P, 1), where the Triton kernel would take one row of P."""
    return x.unsqueeze(1) if x.dim() == 1 else x


def _row_dot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    acc = torch.promote_types(torch.promote_types(x.dtype, y.dtype), torch.float32)
    return (x.flatten(1).to(acc) * y.flatten(1).to(acc)).sum(1).double()


def per_layer_sq_norms(xs: list[torch.Tensor]) -> torch.Tensor:
    """(L,) float64: squared Frobenius norm of every tensor (one launch per dtype on the kernel
    path, one ``_foreach_norm`` on the PyTorch path)."""
    if not xs:
        return torch.zeros(0, dtype=torch.float64)
    if use_sketch_kernels(xs):
        return row_dots([x.reshape(1, -1) for x in xs])[0]
    if use_compiled_multi_tensor(xs):
        from lorambo.ext import ops as ext_ops

        return ext_ops.multi_sq_norm(xs)[0]
    norms = torch._foreach_norm([x.float() if x.dtype in (torch.float16, torch.bfloat16) else x for x in xs])
    return torch.stack([n.double() for n in norms]).square()
