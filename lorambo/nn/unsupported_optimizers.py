"""Refuse torch optimizers whose update of a pool is not their update of the adapter.

``torch.optim.Adafactor`` scales each parameter's step by the RMS of the whole parameter and
caps it by the RMS of the whole update. A pool holds ``capacity - rank`` inactive slots of
zeros that count in both, so below full capacity its updates are not those of Adafactor on the
rank-r adapter (a fresh Adafactor on a freshly built rank-r module): measured 1.4e-2 off after
5 steps at rank 3 of capacity 5. That cannot be corrected from outside the optimizer, so a
process-wide step pre-hook (installed with the first LoRAMBoLinear) raises before such a step.
At ``rank == capacity`` there is no padding and Adafactor is left to run.
"""

from __future__ import annotations

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from lorambo.nn.slots import pool_slots

__all__ = ["refuse_unsupported_optimizers"]

_PADDING_SENSITIVE = tuple(c for c in (getattr(torch.optim, "Adafactor", None),) if c is not None)
_installed = False


def refuse_unsupported_optimizers() -> None:
    """Install the step pre-hook (once per process)."""
    global _installed
    if not _installed and _PADDING_SENSITIVE:
        register_optimizer_step_pre_hook(_before_step)
        _installed = True


def _before_step(optimizer, args, kwargs) -> None:
    if not isinstance(optimizer, _PADDING_SENSITIVE):
        return
    for group in optimizer.param_groups:
        for param in group["params"]:
            tag = pool_slots(param)
            if tag is None:
                continue
            slots, dim = tag
            if slots.rank < param.shape[dim]:
                name = f"{type(optimizer).__module__}.{type(optimizer).__name__}"
                raise RuntimeError(
                    f"{name} cannot train a LoRAMBoLinear pool below its capacity (a pool at rank "
                    f"{slots.rank} of capacity {param.shape[dim]}, shape {tuple(param.shape)}): it scales "
                    "each step by the RMS of the whole parameter and of the whole update, and the inactive "
                    "zero slots count in both, so its updates are not Adafactor's on the rank-r adapter. "
                    "Use another optimizer (lorambo.optim.AdamW, torch.optim.Adam, ...), or capacity == rank")
