"""Per-layer reductions over all targeted layers at once, without a host sync per layer.

The sketches need, for every layer i and probe p, quadratic forms v_ip . (Hv)_ip and squared
norms. A Python loop that reduces each layer and copies it to the host costs L device syncs per
pass; here products go through ``torch._foreach_*`` (one multi-tensor launch per dtype group on
CUDA), the per-layer sums stay on the device and are stacked, and the caller copies one
(P, L) tensor to the host. Where :func:`lorambo.backend.use_compiled_multi_tensor` says so
(the extension is built, CPU tensors), the compiled single-pass reductions of csrc/ run instead:
on the 2-core CPU they measured 2.6x (dots) and 1.1x (squared norms, fp32) faster over 224
7B-shaped tensors (benchmarks/results/ext_cpu.md). A Triton version was not written because no
GPU was available to show it faster.
"""

from __future__ import annotations

import torch

from lorambo.backend import use_compiled_multi_tensor

__all__ = ["per_layer_dots", "per_layer_sq_norms"]


def per_layer_dots(xs: list[torch.Tensor], ys: list[torch.Tensor]) -> torch.Tensor:
    """(P, L) float64: row p, column i = <xs[i][p], ys[i][p]> for tensors of shape (P, ...)."""
    if len(xs) != len(ys):
        raise ValueError(f"per_layer_dots: {len(xs)} tensors vs {len(ys)}")
    if xs and use_compiled_multi_tensor([*xs, *ys]):
        from lorambo import ext_ops

        return ext_ops.multi_dot(xs, ys, rows=xs[0].shape[0])
    products = torch._foreach_mul(xs, ys)
    return torch.stack([p.flatten(1).sum(1, dtype=torch.float64) for p in products], dim=1)


def per_layer_sq_norms(xs: list[torch.Tensor]) -> torch.Tensor:
    """(L,) float64: squared Frobenius norm of every tensor, from one ``_foreach_norm``."""
    if xs and use_compiled_multi_tensor(xs):
        from lorambo import ext_ops

        return ext_ops.multi_sq_norm(xs)[0]
    norms = torch._foreach_norm([x.float() if x.dtype in (torch.float16, torch.bfloat16) else x for x in xs])
    return torch.stack([n.double() for n in norms]).square()
