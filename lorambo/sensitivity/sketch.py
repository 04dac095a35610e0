"""Trace estimators for a symmetric matrix A seen only through products A @ X.

Each estimator is written once as a *program*: a generator that yields blocks of columns
X [dim, m] and is sent back A @ X; it returns (Estimate, number of skipped columns). The same
program runs on an explicit operator (``hutchinson`` / ``hutchpp`` / ``xtrace`` below, matvec
callable) and, in lockstep for all layers, on Hessian blocks H_ii (``trace.hessian_trace``).
Columns of A @ X that are not finite are skipped where the method allows it (probe columns) and
counted; a non-finite product the method cannot do without raises RuntimeError.

num_matvecs is the total number of columns multiplied by A, so methods compare at equal cost:
- Hutchinson: mean of v^T A v over Rademacher v. Var = 2 (||A||_F^2 - sum_j A_jj^2) / n.
- Hutch++ (Meyer, Musco, Musco, Woodruff 2021): m = n/3; Q = orth(A S), then
  Tr(Q^T A Q) + Hutchinson on (I - QQ^T) A (I - QQ^T) with m probes G. Error O(1/n) instead of
  O(1/sqrt n) *for PSD A*; stderr = sample std of the residual Hutchinson part / sqrt(m).
- XTrace (Epperly, Tropp, Webber 2024): m = n/2 probes Omega, Y = A Omega = QR, Z = A Q. Estimate
  i uses the basis of A Omega without column i (independent of omega_i, hence unbiased) plus
  Hutchinson with omega_i on the deflated remainder; the result is the mean of the m exchangeable
  estimates and stderr = their std / sqrt(m) (the paper's error estimate; it ignores the
  correlation between the m estimates and runs optimistic, by ~1.2-1.7x on the test Hessian
  blocks, so read it as a scale, not a calibrated interval). When m reaches dim, Q spans
  everything and Tr(Q^T A Q) is returned: exact, stderr 0 (as Hutch++ does). The leave-one-out
  bases are subspaces of range(Q), so every term comes from Y, Z and Q^T Omega in the m-dim
  coefficient space: no extra products; a small SVD per i drops numerically dependent directions
  (any basis independent of omega_i keeps the estimate unbiased).
Both sketching methods need a symmetric A and help when its spectrum decays fast (few large
eigenvalues carry the trace); Hessian blocks are indefinite, so the gain is not guaranteed there
and Hutchinson (1 product per probe for *all* layers) is the default in ``hessian_trace``.
"""

from __future__ import annotations

import math
from typing import Callable, Generator

import torch

from .estimate import Estimate
from .inputs import NonFiniteProducts, check_positive, check_seed
from .probes import rademacher

__all__ = ["hutchinson", "hutchpp", "xtrace", "run_program",
           "hutchinson_program", "hutchpp_program", "xtrace_program"]

Program = Generator[torch.Tensor, torch.Tensor, tuple]


def _probes(dim, m, seed, stream, tag, dtype, device, start=0) -> torch.Tensor:
    seed = check_seed(seed)
    cols = [rademacher((dim,), seed, stream, tag, k, dtype=dtype, device=device)
            for k in range(start, start + m)]
    if not cols:
        return torch.empty((dim, 0), dtype=dtype, device=device)
    return torch.stack(cols, dim=1)  # (dim, m)


def _finite_cols(x: torch.Tensor) -> torch.Tensor:
    return torch.isfinite(x).all(dim=0)


def _mean_stderr(samples: torch.Tensor) -> tuple[float, float]:
    n = samples.numel()
    if n == 0:
        return math.nan, math.inf
    mean = float(samples.mean())
    return mean, (float(samples.std() / math.sqrt(n)) if n > 1 else math.inf)


def hutchinson_program(dim, num_matvecs, seed=0, stream=0, dtype=torch.float64, device=None) -> Program:
    v = _probes(dim, num_matvecs, seed, stream, "hutchinson", dtype, device)
    av = yield v
    ok = _finite_cols(av)
    samples = (v * av).sum(0)[ok]
    if samples.numel() == 0:
        raise NonFiniteProducts(f"all {num_matvecs} probes gave non-finite matrix-vector products")
    mean, err = _mean_stderr(samples)
    return Estimate(mean, err, samples.numel()), int((~ok).sum())


def hutchpp_program(dim, num_matvecs, seed=0, stream=0, dtype=torch.float64, device=None) -> Program:
    if num_matvecs < 3:
        raise ValueError(f"hutch++ needs at least 3 matrix-vector products, got {num_matvecs}")
    m = num_matvecs // 3
    s = _probes(dim, min(m, dim), seed, stream, "hutch++/S", dtype, device)
    y = yield s
    ok = _finite_cols(y)
    if not ok.any():
        raise NonFiniteProducts("all hutch++ sketch columns gave non-finite matrix-vector products")
    q = torch.linalg.qr(y[:, ok])[0]                                     # (dim, k)
    full = q.shape[1] >= dim               # Q spans everything: Tr(Q^T A Q) is exact
    g = _probes(dim, 0 if full else m, seed, stream, "hutch++/G", dtype, device)
    g = g - q @ (q.T @ g)                                                # (I - QQ^T) G
    both = yield torch.cat([q, g], dim=1)
    z, ag = both[:, :q.shape[1]], both[:, q.shape[1]:]
    if not torch.isfinite(z).all():
        raise NonFiniteProducts("non-finite product A Q in the hutch++ sketch")
    ok_g = _finite_cols(ag)
    samples = (g * ag).sum(0)[ok_g]
    low_rank = float((q * z).sum())
    if full:
        mean, err = 0.0, 0.0
    elif samples.numel() == 0:
        raise NonFiniteProducts("all hutch++ residual probes gave non-finite matrix-vector products")
    else:
        mean, err = _mean_stderr(samples)
    bad = int((~ok).sum() + (~ok_g).sum())
    used = int(ok.sum()) + q.shape[1] + int(ok_g.sum())  # the finite products, as the others count
    return Estimate(low_rank + mean, err, used), bad


def xtrace_program(dim, num_matvecs, seed=0, stream=0, dtype=torch.float64, device=None) -> Program:
    if num_matvecs < 4:
        raise ValueError(f"xtrace needs at least 4 matrix-vector products, got {num_matvecs}")
    m = min(num_matvecs // 2, dim)
    omega = _probes(dim, m, seed, stream, "xtrace", dtype, device)
    y = yield omega
    ok = _finite_cols(y)
    if int(ok.sum()) < min(2, dim):
        raise NonFiniteProducts("fewer than 2 xtrace probes gave finite matrix-vector products")
    omega, y = omega[:, ok], y[:, ok]
    m = omega.shape[1]
    q, r = torch.linalg.qr(y)                                            # (dim, m), (m, m)
    z = yield q
    if not torch.isfinite(z).all():
        raise NonFiniteProducts("non-finite product A Q in the xtrace sketch")
    h = q.T @ z                                                          # Q^T A Q  (m, m)
    if m >= dim:
        # Q (Householder: orthonormal even when Y is rank-deficient, e.g. two equal +-1 probes in
        # dim 2) spans everything, so Tr(Q^T A Q) is exact. The leave-one-out estimates would
        # stay random here, and may all agree by chance: a wrong value with stderr ~0.
        return Estimate(float(h.diagonal().sum()), 0.0, 2 * m), int((~ok).sum())
    w = q.T @ omega                                                      # Q^T Omega (m, m)
    # leave-one-out bases: U_i = orthonormal basis of range(R without column i)
    keep = ~torch.eye(m, dtype=torch.bool, device=r.device)
    r_minus = torch.stack([r[:, keep[i]] for i in range(m)])            # (m, m, m-1)
    u, sv, _ = torch.linalg.svd(r_minus, full_matrices=False)           # (m, m, m-1)
    tol = sv.amax(dim=1, keepdim=True) * m * torch.finfo(dtype).eps ** 0.5
    u = u * (sv > tol).unsqueeze(1)                                      # drop dependent directions
    hu = torch.einsum("iab,ibc->iac", u.transpose(1, 2) @ h.unsqueeze(0), u)  # U_i^T H U_i
    a = torch.einsum("iak,ai->ik", u, w)                                  # U_i^T w_i
    b = torch.einsum("iak,ai->ik", u, r)                                  # U_i^T r_i (r_i = Q^T y_i)
    ests = (hu.diagonal(dim1=1, dim2=2).sum(1)                           # Tr(Q_(i)^T A Q_(i))
            + (omega * y).sum(0)                                         # w^T A w
            - 2 * (a * b).sum(1)                                         # -2 w^T P_i A w
            + torch.einsum("ik,ikl,il->i", a, hu, a))                    # w^T P_i A P_i w
    mean, err = _mean_stderr(ests)
    return Estimate(mean, err, 2 * m), int((~ok).sum())


def run_program(program: Program, matvec: Callable[[torch.Tensor], torch.Tensor]) -> tuple:
    """Drive a program with an explicit matvec; returns what the program returns."""
    try:
        x = next(program)
        while True:
            x = program.send(matvec(x))
    except StopIteration as stop:
        return stop.value


def _explicit(program_fn, matvec, dim, num_matvecs, seed, dtype, device) -> Estimate:
    num_matvecs = check_positive("num_matvecs", num_matvecs)
    dim = check_positive("dim", dim)  # 0 failed later inside matvec with a shape mismatch
    est, _ = run_program(program_fn(dim, num_matvecs, seed, 0, dtype, device), matvec)
    return est


def hutchinson(matvec: Callable[[torch.Tensor], torch.Tensor], dim: int, num_matvecs: int, seed: int = 0,
               dtype: torch.dtype = torch.float64, device: torch.device | str | None = None) -> Estimate:
    """Hutchinson trace estimate of A (symmetric or not); matvec(X [dim, m]) -> A @ X."""
    return _explicit(hutchinson_program, matvec, dim, num_matvecs, seed, dtype, device)


def hutchpp(matvec: Callable[[torch.Tensor], torch.Tensor], dim: int, num_matvecs: int, seed: int = 0,
            dtype: torch.dtype = torch.float64, device: torch.device | str | None = None) -> Estimate:
    """Hutch++ trace estimate of a symmetric A with num_matvecs products."""
    return _explicit(hutchpp_program, matvec, dim, num_matvecs, seed, dtype, device)


def xtrace(matvec: Callable[[torch.Tensor], torch.Tensor], dim: int, num_matvecs: int, seed: int = 0,
           dtype: torch.dtype = torch.float64, device: torch.device | str | None = None) -> Estimate:
    """XTrace trace estimate of a symmetric A with num_matvecs products."""
    return _explicit(xtrace_program, matvec, dim, num_matvecs, seed, dtype, device)
