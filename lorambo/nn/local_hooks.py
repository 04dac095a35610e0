"""Module hooks that stay with the model object they were registered on.

A model copied while a hook is registered (``copy.deepcopy`` for an EMA, teacher or reference
model, ``pickle`` / ``torch.save`` for a checkpoint) carries the hook along. A closure hook does
not pickle, so the save fails; and a deep copy shares the closure, so the copy's forward passes
feed the statistics of the original (online growth's capture, FisherProxy), and keep feeding
them after the original's handle has removed its own hook. A :class:`LocalHook` becomes
:func:`no_op` in every copy.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["LocalHook", "no_op"]


def no_op(*args) -> None:
    """What a LocalHook is in a copy of the model: any hook signature, changes nothing."""


def _copied() -> Callable:
    return no_op


class LocalHook:
    """``hook(*args)`` in the model it was registered on; :func:`no_op` in copies of it."""

    def __init__(self, hook: Callable):
        self.hook = hook

    def __call__(self, *args):
        return self.hook(*args)

    def __reduce__(self):
        return _copied, ()

    def __deepcopy__(self, memo):
        return no_op
