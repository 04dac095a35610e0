"""Rademacher probes regenerated on demand from (seed, key...).

Probe k of layer l is a pure function of (seed, l, tag, k): nothing is stored between passes,
probes do not depend on how many are computed per pass (so batched and looped runs agree), and
every rank of a distributed job draws the same probes.
"""

from __future__ import annotations

import hashlib

import torch

__all__ = ["probe_seed", "rademacher"]


def probe_seed(*key) -> int:
    """A stable 63-bit seed from a tuple of ints / strings (unlike hash(), not salted per run)."""
    digest = hashlib.blake2b(repr(key).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def rademacher(shape, *key, dtype=torch.float64, device=None) -> torch.Tensor:
    """Independent +-1 entries with probability 1/2 each, determined by ``key``.

    Drawn with a generator on ``device`` (CPU and CUDA streams differ, each is deterministic).
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    gen = torch.Generator(device=device)
    gen.manual_seed(probe_seed(*key))
    out = torch.empty(shape, dtype=dtype, device=device)
    return out.bernoulli_(0.5, generator=gen).mul_(2).sub_(1)
