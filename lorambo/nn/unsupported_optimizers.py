"""Refuse torch optimizers whose update of a pool is not their update of the adapter.

``torch.optim.Adafactor`` scales each parameter's step by the RMS of the whole parameter and
caps it by the RMS of the whole update. A pool holds ``capacity - rank`` inactive slots of
zeros that count in both, so below full capacity its updates are not those of Adafactor on the
rank-r adapter (a fresh Adafactor on a freshly built rank-r module): measured 1.4e-2 off after
5 steps at rank 3 of capacity 5. That cannot be corrected from outside the optimizer, so a
process-wide step pre-hook (installed with the first LoRAMBoLinear) raises before such a step.
At ``rank == capacity`` there is no padding and Adafactor is left to run. transformers' own
``Adafactor`` (``Trainer(optim="adafactor")``) scales and clips the same way, and its factored
second moment averages over the padded dims too (measured 3.3e-3 off after 3 steps with its
defaults, 1.2e-3 with a fixed lr): refused alike.

``torch.optim.Muon`` orthogonalizes each update (the inactive zero slots do not change that)
but then scales its learning rate by the parameter's shape: with ``adjust_lr_fn`` None or
``"original"`` by ``sqrt(max(1, rows / cols))``, which for ``lora_B`` [out, capacity] is
``sqrt(out / capacity)`` where the rank-r adapter takes ``sqrt(out / r)`` (measured 1.0e-2 off
after 3 steps at lr 1e-2, rank 2 of capacity 4). Its steps are refused where that factor
differs; ``adjust_lr_fn="match_rms_adamw"`` scales by the larger side, which the pools share
with the adapter, and trains it exactly as Muon on the rank-r adapter.
"""

from __future__ import annotations

import math
import sys

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from lorambo.nn.slots import pool_slots

__all__ = ["refuse_unsupported_optimizers"]

_ADAFACTOR = tuple(c for c in (getattr(torch.optim, "Adafactor", None),) if c is not None)
_MUON = tuple(c for c in (getattr(torch.optim, "Muon", None),) if c is not None)
_installed = False


def refuse_unsupported_optimizers() -> None:
    """Install the step pre-hook (once per process)."""
    global _installed
    if not _installed:
        register_optimizer_step_pre_hook(_before_step)
        _installed = True


def _is_adafactor(optimizer) -> bool:
    if isinstance(optimizer, _ADAFACTOR):
        return True
    # transformers' Adafactor, looked up only where transformers is already imported
    theirs = getattr(sys.modules.get("transformers.optimization"), "Adafactor", None)
    return isinstance(theirs, type) and isinstance(optimizer, theirs)


def _before_step(optimizer, args, kwargs) -> None:
    if not (isinstance(optimizer, _MUON) or _is_adafactor(optimizer)):
        return
    for group in optimizer.param_groups:
        for param in group["params"]:
            tag = pool_slots(param)
            if tag is None:
                continue
            slots, dim = tag
            name = f"{type(optimizer).__module__}.{type(optimizer).__name__}"
            if isinstance(optimizer, _MUON):
                _check_muon_lr(name, group.get("adjust_lr_fn"), param.shape, slots.rank, dim)
            elif slots.rank < param.shape[dim]:
                raise RuntimeError(
                    f"{name} cannot train a LoRAMBoLinear pool below its capacity (a pool at rank "
                    f"{slots.rank} of capacity {param.shape[dim]}, shape {tuple(param.shape)}): it scales "
                    "each step by the RMS of the whole parameter and of the whole update, and the inactive "
                    "zero slots count in both, so its updates are not Adafactor's on the rank-r adapter. "
                    "Use another optimizer (lorambo.optim.AdamW, torch.optim.Adam, ...), or capacity == rank")


def _muon_lr_ratio(adjust_lr_fn, rows: int, cols: int) -> float:
    """The factor torch.optim.Muon multiplies the learning rate by for a [rows, cols] parameter."""
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return math.sqrt(max(1.0, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    return 1.0


def _check_muon_lr(name: str, adjust_lr_fn, shape, rank: int, dim: int) -> None:
    if rank == 0 or len(shape) != 2:  # nothing active (every update is 0); Muon refuses other shapes itself
        return
    active = list(shape)
    active[dim] = rank
    padded_ratio, adapter_ratio = _muon_lr_ratio(adjust_lr_fn, *shape), _muon_lr_ratio(adjust_lr_fn, *active)
    if padded_ratio != adapter_ratio:
        raise RuntimeError(
            f"{name} with adjust_lr_fn={adjust_lr_fn!r} scales the learning rate by the parameter's shape, and a "
            f"LoRAMBoLinear pool at rank {rank} of capacity {shape[dim]} (shape {tuple(shape)}) would get "
            f"{padded_ratio:.4g} x lr where the rank-{rank} adapter gets {adapter_ratio:.4g} x lr. Use "
            "adjust_lr_fn='match_rms_adamw' (then the pool trains exactly as the rank-r adapter), another "
            "optimizer, or capacity == rank")
