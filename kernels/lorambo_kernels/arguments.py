"""The scalars the launchers take, checked once here for all of them: the Philox seed and the
dropout probability.

A valid seed is what lorambo's ops take (``lorambo/ops/seed_argument.py``; this package does not
import lorambo): an integer in [0, 2**63) (a Python or numpy int, not a bool) or a 0-d int64 CPU
tensor holding one. ``int(seed)`` alone would truncate 1.7 to 1, read True as 1 and pass a
negative or 64-bit-overflowing value to the kernels as another stream. A valid dropout_p is a
real number in [0, 1), as lorambo's ops take it: the kernels drop nothing for a p <= 0 or nan,
every element for a p >= 1 (and p = 1 divides the kept ones by zero).
"""

from __future__ import annotations

import numbers

import torch

__all__ = ["MAX_SEED", "checked_dropout_p", "checked_seed"]

MAX_SEED = 2**63 - 1


def checked_seed(fn: str, seed) -> int:
    """``seed`` as a Python int; a ValueError naming ``fn`` and the value unless it is valid."""
    if type(seed) is int and 0 <= seed <= MAX_SEED:  # the common case, in one test
        return seed
    if isinstance(seed, torch.Tensor):
        if seed.dim() != 0 or seed.dtype != torch.int64 or seed.device.type != "cpu":
            raise ValueError(f"{fn}: a tensor seed must be a 0-d int64 CPU tensor, got shape {tuple(seed.shape)}, "
                             f"{seed.dtype} on {seed.device}")
        seed = int(seed)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"{fn}: seed must be an int in [0, 2**63), got {seed!r}")
    return int(seed)


def checked_dropout_p(fn: str, dropout_p) -> float:
    """``dropout_p`` as a Python float; a TypeError naming ``fn`` and the value for no real number (a
    bool, a tensor, a string), a ValueError for one outside [0, 1)."""
    if isinstance(dropout_p, (bool, torch.Tensor)) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"{fn}: dropout_p must be a real number (a Python float), got {dropout_p!r}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{fn}: dropout_p {dropout_p!r} must be in [0, 1)")
    return float(dropout_p)
