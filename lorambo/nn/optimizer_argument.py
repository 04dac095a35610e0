"""The ``optimizer=`` argument of the calls that change ranks.

A rank change edits the state of the torch optimizer that steps the pools and asks it which
optimizer it is (the start values of :mod:`lorambo.nn.fresh_state`, SGD's momentum start in
:mod:`lorambo.nn.fresh_momentum`) and whether it stepped the pools
(:mod:`lorambo.nn.optimizer_tracking`). Training frameworks hand out a wrapper instead:
accelerate's ``AcceleratedOptimizer`` (what ``accelerator.prepare(optimizer)`` returns and
transformers' Trainer holds) is a ``torch.optim.Optimizer`` that keeps the real one as
``.optimizer`` and forwards ``state`` and ``param_groups`` to it. Taken as it is, a rank change
would see neither Rprop nor Adagrad nor SGD behind it (new slots would start at zero, not at a
fresh optimizer's state) and would warn that the optimizer had been left behind. torch's
``ZeroRedundancyOptimizer`` keeps the optimizer that holds the state (of this process's share
of the parameters) as ``.optim``, and its own ``state`` stays empty: a rank change given it
would leave the moments of dropped slots in place, and Adam would move those slots off zero
again. A wrapper is therefore replaced by the optimizer it wraps.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

__all__ = ["OptimizerArgument", "optimizer_argument", "each_optimizer", "inner_optimizer", "scaler_keyed_optimizer",
           "skips_this_step", "wrapper_grad_scaler"]

# where a wrapper keeps the optimizer it wraps: accelerate's AcceleratedOptimizer, torch's
# ZeroRedundancyOptimizer
_WRAPPED = ("optimizer", "optim")

# What ``optimizer=`` takes, for type checkers: one optimizer (or wrapper), or a list or tuple of them.
OptimizerArgument = torch.optim.Optimizer | Sequence[torch.optim.Optimizer]


def optimizer_argument(optimizer, caller: str):
    """The optimizer whose state a rank change edits: ``optimizer`` itself, or the torch
    optimizer inside a wrapper that keeps it as ``.optimizer`` or ``.optim``; None stays None.
    A list or tuple of optimizers gives a tuple of those optimizers (each unwrapped, each once;
    one item gives that optimizer). Anything without ``state`` and ``param_groups`` (an LR
    scheduler, say), as the argument or as an item of the list, is a TypeError naming
    ``caller``; an empty list is a ValueError."""
    if optimizer is None:
        return None
    if isinstance(optimizer, (list, tuple)):
        if not optimizer:
            raise ValueError(f"{caller}: optimizer is an empty {type(optimizer).__name__}; pass the optimizers "
                             "that step the LoRA pools, or None")
        unique = {}
        for i, item in enumerate(optimizer):
            checked = _one_optimizer(item, caller, f"optimizer[{i}]")
            unique.setdefault(id(checked), checked)  # the same optimizer twice would move its state twice
        return next(iter(unique.values())) if len(unique) == 1 else tuple(unique.values())
    return _one_optimizer(optimizer, caller, "optimizer")


def inner_optimizer(optimizer):
    """The optimizer that holds the state behind any chain of wrappers (``.optimizer``, ``.optim``):
    accelerate's ``AcceleratedOptimizer`` around a ``ZeroRedundancyOptimizer`` gives the torch
    optimizer the latter wraps. Anything else is returned as it is. Rank changes edit its state,
    and what kind of optimizer it is (a torch Adam, lorambo's AdamW) is read from it."""
    while isinstance(optimizer, torch.optim.Optimizer):
        inner = next((value for value in (getattr(optimizer, attr, None) for attr in _WRAPPED)
                      if isinstance(value, torch.optim.Optimizer)), None)
        if inner is None or inner is optimizer:
            break
        optimizer = inner
    return optimizer


def scaler_keyed_optimizer(optimizer):
    """The optimizer a GradScaler keeps its per-optimizer record (unscaled yet, inf found) for:
    the one accelerate's ``AcceleratedOptimizer`` hands ``scaler.step`` (its ``.optimizer``, which
    may itself be a wrapper such as ``ZeroRedundancyOptimizer``), else ``optimizer`` itself."""
    return optimizer.optimizer if _wraps_as_accelerate_does(optimizer) else optimizer


def _one_optimizer(optimizer, caller: str, what: str):
    optimizer = inner_optimizer(optimizer)
    if not (isinstance(getattr(optimizer, "state", None), Mapping)
            and isinstance(getattr(optimizer, "param_groups", None), list)):
        # the type, not the repr: a parameter list's repr prints every tensor
        raise TypeError(f"{caller}: {what} must be a torch optimizer (the one that steps the LoRA pools, with "
                        f".state and .param_groups), a list of them, or None, got {type(optimizer).__name__}")
    return optimizer


def each_optimizer(optimizer, layer=None) -> tuple:
    """The optimizers in an argument checked by :func:`optimizer_argument`: () for None. With
    ``layer``, of several optimizers only those whose groups hold its ``lora_A`` or ``lora_B``
    (a single optimizer is returned as it is)."""
    if optimizer is None:
        return ()
    if not isinstance(optimizer, tuple):
        return (optimizer,)
    if layer is None:
        return optimizer
    pools = {id(layer.lora_A), id(layer.lora_B)}
    return tuple(opt for opt in optimizer
                 if any(id(p) in pools for group in opt.param_groups for p in group["params"]))


def _wraps_as_accelerate_does(optimizer) -> bool:
    """Whether ``optimizer`` keeps a torch optimizer as ``.optimizer`` (accelerate's ``AcceleratedOptimizer``)."""
    return isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer)


def wrapper_grad_scaler(optimizer):
    """The GradScaler an optimizer wrapper steps with: accelerate's ``AcceleratedOptimizer`` keeps
    the accelerator's as ``.scaler`` (None without fp16 loss scaling). None for an optimizer that
    wraps none. A rank decision given such a wrapper takes its gradients in units of the loss the
    scaler scaled."""
    if not _wraps_as_accelerate_does(optimizer):
        return None
    return getattr(optimizer, "scaler", None)


def skips_this_step(optimizer) -> bool:
    """Whether ``optimizer`` is a wrapper whose ``step()`` does nothing now: accelerate's
    ``AcceleratedOptimizer`` inside ``accelerator.accumulate`` on a micro-batch that does not end
    the accumulation (its ``gradient_state.sync_gradients`` is False). The step's gradients are
    then still being accumulated."""
    if not _wraps_as_accelerate_does(optimizer):
        return False
    return getattr(getattr(optimizer, "gradient_state", None), "sync_gradients", True) is False
