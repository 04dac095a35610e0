"""Best rank-r approximation errors of a weight matrix, plain and data-weighted."""

from __future__ import annotations

import numbers

import torch

__all__ = ["frobenius_tail_energy", "data_weighted_tail_energy"]


def _tails(sigma: torch.Tensor, max_rank: int) -> torch.Tensor:
    """E[r] = sum_{j >= r} sigma_j^2 for r = 0..max_rank (sigma descending, 0-indexed)."""
    sq = sigma.double().pow(2)
    tail = torch.cat([sq.flip(0).cumsum(0).flip(0), sq.new_zeros(1)])   # (len + 1,)
    if max_rank + 1 > tail.numel():
        tail = torch.cat([tail, tail.new_zeros(max_rank + 1 - tail.numel())])
    return tail[:max_rank + 1]


def _check_rank(max_rank, full: int) -> int:
    if max_rank is None:
        return full
    if isinstance(max_rank, bool) or not isinstance(max_rank, numbers.Integral) or max_rank < 0:
        raise ValueError(f"max_rank must be a non-negative integer, got {max_rank!r}")
    return int(max_rank)


def _check_finite(who: str, what: str, t: torch.Tensor) -> None:
    """ValueError for NaN/inf: torch's SVD / eigh would fail with a message about convergence or
    conditioning that does not point at the data."""
    bad = int((~torch.isfinite(t)).sum())
    if bad:
        raise ValueError(f"{who}: {what} has {bad} NaN/inf entries of {t.numel()}")


def frobenius_tail_energy(W: torch.Tensor, max_rank: int | None = None,
                          randomized: bool = False) -> torch.Tensor:
    """E[r] = min_{rank X <= r} ||W - X||_F^2 = sum_{j > r} sigma_j(W)^2, r = 0..R (float64).

    R = max_rank or min(W.shape). randomized=True uses torch.svd_lowrank for the top
    max_rank singular values (required then) and E[r] = ||W||_F^2 - sum_{j <= r} sigma_j^2,
    exact when rank(W) <= max_rank + 10 (the oversampling), approximate otherwise.
    """
    if W.ndim != 2:
        raise ValueError(f"W must be a matrix, got shape {tuple(W.shape)}")
    full = min(W.shape)
    max_rank = _check_rank(max_rank, full)
    _check_finite("frobenius_tail_energy", "W", W.detach())
    work = W.detach().to(torch.promote_types(W.dtype, torch.float32))
    if not randomized:
        return _tails(torch.linalg.svdvals(work), max_rank)
    q = min(max_rank + 10, full)
    _, sigma, _ = torch.svd_lowrank(work, q=q, niter=4)
    sigma = sigma[:min(max_rank, full)].double()
    head = torch.cat([sigma.new_zeros(1), sigma.pow(2).cumsum(0)])
    if head.numel() < max_rank + 1:
        head = torch.cat([head, head[-1].expand(max_rank + 1 - head.numel())])
    return (work.double().pow(2).sum() - head).clamp_min(0.0)


def data_weighted_tail_energy(W: torch.Tensor, G: torch.Tensor,
                              max_rank: int | None = None) -> torch.Tensor:
    """E[r] = min_{rank X <= r} Tr((W - X) G (W - X)^T), r = 0..R, for W [out, in], G [in, in] PSD.

    With G = V diag(lambda) V^T (eigh; lambda clamped at 0, G may be singular),
    Tr((W-X) G (W-X)^T) = ||(W - X) G^{1/2}||_F^2, and X G^{1/2} ranges over every rank-r matrix
    whose rows lie in range(G) -- where the rows of W G^{1/2} lie -- so by Eckart-Young
    E[r] = sum_{j > r} sigma_j(W G^{1/2})^2 = tail energies of sigma(W V diag(sqrt(lambda))).
    Pass a Conv1D weight transposed (its weight is [in, out]). R = max_rank or min(out, in).
    """
    if W.ndim != 2 or G.ndim != 2 or G.shape[0] != G.shape[1] or W.shape[1] != G.shape[0]:
        raise ValueError(f"need W [out, in] and G [in, in], got W {tuple(W.shape)} and G "
                         f"{tuple(G.shape)} (transpose a Conv1D weight)")
    max_rank = _check_rank(max_rank, min(W.shape))
    _check_finite("data_weighted_tail_energy", "W", W.detach())
    _check_finite("data_weighted_tail_energy", "G", G.detach())
    dtype = torch.promote_types(torch.promote_types(W.dtype, G.dtype), torch.float32)
    g = G.detach().to(W.device, dtype)
    lam, vec = torch.linalg.eigh((g + g.T) / 2)
    root = vec * lam.clamp_min(0.0).sqrt()                                # G^{1/2} V (in, in)
    return _tails(torch.linalg.svdvals(W.detach().to(dtype) @ root), max_rank)
