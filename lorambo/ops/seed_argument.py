"""The dropout seed every LoRA op takes: an int in [0, 2**63) or a 0-d int64 CPU tensor.

One check for all backends' public ops, so a seed one backend refuses is not silently truncated
(3.5 -> 3, True -> 1), wrapped or passed to a generator as another value by the others.
"""

from __future__ import annotations

import numbers

import torch

__all__ = ["MAX_SEED", "check_seed"]

MAX_SEED = 2**63 - 1


def check_seed(op: str, seed) -> None:
    """Raise a ValueError naming ``op`` and the value unless ``seed`` is an int in [0, 2**63) or
    a 0-d int64 CPU tensor (a graph value under torch.compile: its value is not read here)."""
    if seed is None:
        raise ValueError(f"{op}: dropout_p > 0 needs an integer seed")
    if isinstance(seed, torch.Tensor):
        if seed.dim() != 0 or seed.dtype != torch.int64 or seed.device.type != "cpu":
            raise ValueError(f"{op}: a tensor seed must be a 0-d int64 CPU tensor, got shape {tuple(seed.shape)}, "
                             f"{seed.dtype} on {seed.device}")
    elif isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"{op}: seed must be an int in [0, 2**63), got {seed!r}")
