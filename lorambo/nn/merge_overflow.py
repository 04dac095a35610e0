"""Refusing a merge whose weights would not be finite.

A merge adds ``s B A`` to the base weight (in float64) and rounds the sum to the weight's dtype.
In float16 (largest finite value 65504) a large adapter rounds to inf there, and the merged
model then computes inf/NaN with no error. :func:`finite_merge` names the layer instead, before
anything is written. :func:`merge_may_overflow` is the cheap bound that spares computing
the sum twice in the usual case (a first pass to check, a second to merge).
"""

from __future__ import annotations

import torch

__all__ = ["merge_may_overflow", "finite_merge"]


@torch.no_grad()
def merge_may_overflow(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, rank: int,
                       scaling: float) -> bool:
    """False when ``weight + s B_r A_r`` certainly fits ``weight``'s dtype:
    ``|Δ_ij| <= |s| ‖B_i‖ ‖A_:j‖`` (Cauchy-Schwarz), so ``max|w| + |s| max‖B_i‖ max‖A_:j‖``
    below the dtype's largest value bounds every merged element. NaN anywhere fails the test.
    Meta tensors hold no values: nothing to check."""
    if weight.is_meta:
        return False
    limit = torch.finfo(weight.dtype).max
    bound = weight.detach().abs().max().double()
    if rank > 0:
        b = lora_B.detach()[:, :rank].double().norm(dim=1).max()
        a = lora_A.detach()[:rank].double().norm(dim=0).max()
        bound = bound + abs(scaling) * b * a
    return not bool(bound < limit)


def finite_merge(label: str, weight: torch.Tensor, delta: torch.Tensor, caller: str = "merge") -> torch.Tensor:
    """``weight + delta`` (delta float64, in the weight's layout), summed in float64 and rounded
    to the weight's dtype; a RuntimeError naming ``caller`` and ``label`` when that puts inf/NaN
    where the weight is finite (the sum overflows the dtype, or the adapter is not finite)."""
    total = weight.detach().double() + delta
    merged = total.to(weight.dtype)
    if merged.is_meta:  # no values (a model built on the meta device): nothing to check
        return merged
    bad = ~torch.isfinite(merged) & torch.isfinite(weight)
    if bool(bad.any()):
        raise RuntimeError(
            f"{caller}: {label}: merging would put {int(bad.sum())} non-finite value(s) (inf/NaN) into the "
            f"{weight.dtype} base weight (largest |w + delta| {float(total.abs().max()):.6g}; {weight.dtype} holds "
            f"up to {torch.finfo(weight.dtype).max:.6g}). Nothing was changed: merge in a wider dtype "
            "(model.float() first) or keep the adapter unmerged")
    return merged
