"""The result type of every stochastic estimator and a streaming mean/variance accumulator."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["Estimate", "Moments"]


@dataclass(frozen=True)
class Estimate:
    """A scalar estimate with its standard error.

    value:      the estimate (e.g. Tr(H_i)).
    stderr:     standard error of ``value`` (inf when it cannot be estimated, e.g. one probe;
                for power iteration the last change of the iterate, see ``hessian_opnorm``).
    num_probes: probes / matrix-vector products the estimate used (per layer).
    """

    value: float
    stderr: float
    num_probes: int

    @property
    def rel_stderr(self) -> float:
        """stderr / |value| (0 when both are 0, inf when only the value is 0)."""
        if self.stderr == 0.0:
            return 0.0
        if self.value == 0.0:
            return math.inf
        return self.stderr / abs(self.value)


class Moments:
    """Streaming mean and variance of a vector-valued sample, one entry per layer.

    Keeps shifted power sums s1 = sum(x - c), s2 = sum((x - c)^2) in float64 with the shift c
    set to the first sample, so var = (s2 - s1^2 / n) / (n - 1) does not suffer the catastrophic
    cancellation of raw sums when |mean| >> std (traces are often far from 0).
    """

    def __init__(self, size: int):
        self.size = size
        self.n = 0
        self.shift: torch.Tensor | None = None
        self.s1 = torch.zeros(size, dtype=torch.float64)
        self.s2 = torch.zeros(size, dtype=torch.float64)

    def add(self, x: torch.Tensor) -> None:
        """Add samples x [num_samples, size] (any dtype / device)."""
        x = x.detach().to("cpu", torch.float64).reshape(-1, self.size)
        if x.shape[0] == 0:
            return
        if self.shift is None:
            self.shift = x[0].clone()
        d = x - self.shift
        self.s1 += d.sum(0)
        self.s2 += (d * d).sum(0)
        self.n += x.shape[0]

    def mean(self) -> torch.Tensor:
        if self.n == 0:
            return torch.full((self.size,), math.nan, dtype=torch.float64)
        return self.shift + self.s1 / self.n

    def stderr(self) -> torch.Tensor:
        """Standard error of the mean, sqrt(sample variance / n); inf below two samples."""
        if self.n < 2:
            return torch.full((self.size,), math.inf, dtype=torch.float64)
        var = (self.s2 - self.s1 * self.s1 / self.n) / (self.n - 1)
        return (var.clamp_min(0.0) / self.n).sqrt()

    def estimates(self) -> list[Estimate]:
        return [Estimate(float(m), float(s), self.n) for m, s in zip(self.mean(), self.stderr())]

    def rel_stderr(self) -> torch.Tensor:
        return torch.tensor([e.rel_stderr for e in self.estimates()], dtype=torch.float64)
