"""Per-layer reductions over all targeted layers at once, without a host sync per layer.

The sketches need, for every layer i and probe p, quadratic forms v_ip . (Hv)_ip and squared
norms. A Python loop that reduces each layer and copies it to the host costs L device syncs per
pass; here products go through ``torch._foreach_*`` (one multi-tensor launch per dtype group on
CUDA), the per-layer sums stay on the device and are stacked, and the caller copies one
(P, L) tensor to the host. The compiled extension (csrc/) is the place for a single-launch
reduction; a Triton version was not written because no GPU was available to show it faster.
"""

from __future__ import annotations

import torch

__all__ = ["per_layer_dots", "per_layer_sq_norms"]


def per_layer_dots(xs: list[torch.Tensor], ys: list[torch.Tensor]) -> torch.Tensor:
    """(P, L) float64: row p, column i = <xs[i][p], ys[i][p]> for tensors of shape (P, ...)."""
    if len(xs) != len(ys):
        raise ValueError(f"per_layer_dots: {len(xs)} tensors vs {len(ys)}")
    products = torch._foreach_mul(xs, ys)
    return torch.stack([p.flatten(1).sum(1, dtype=torch.float64) for p in products], dim=1)


def per_layer_sq_norms(xs: list[torch.Tensor]) -> torch.Tensor:
    """(L,) float64: squared Frobenius norm of every tensor, from one ``_foreach_norm``."""
    norms = torch._foreach_norm([x.float() if x.dtype in (torch.float16, torch.bfloat16) else x for x in xs])
    return torch.stack([n.double() for n in norms]).square()
