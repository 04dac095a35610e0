"""The Philox seed every launcher takes, checked once here for all of them.

A valid seed is what lorambo's ops take (``lorambo/ops/seed_argument.py``; this package does not
import lorambo): an integer in [0, 2**63) (a Python or numpy int, not a bool) or a 0-d int64 CPU
tensor holding one. ``int(seed)`` alone would truncate 1.7 to 1, read True as 1 and pass a
negative or 64-bit-overflowing value to the kernels as another stream.
"""

from __future__ import annotations

import numbers

import torch

__all__ = ["MAX_SEED", "checked_seed"]

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
