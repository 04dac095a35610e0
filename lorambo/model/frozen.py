"""The parameters lorambo froze in a model, so that ``unload`` can make them trainable again.

``configure_model`` freezes every parameter that is not LoRA and records it here; modules to
save are taken off the record (they train on purpose); ``unload`` re-enables what is left. The
record is a plain attribute of the model: never state, never a submodule, so it reaches no
state_dict or checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

__all__ = ["frozen_by_lorambo", "record_frozen", "release_frozen", "forget_frozen"]

_ATTR = "_lorambo_frozen_params"


def frozen_by_lorambo(model: nn.Module) -> list[nn.Parameter]:
    """The parameters lorambo froze and ``unload`` would re-enable (a copy; [] when none)."""
    return list(getattr(model, _ATTR, []))


def record_frozen(model: nn.Module, params: Iterable[nn.Parameter]) -> None:
    """Freeze ``params`` and add them to the record."""
    frozen = getattr(model, _ATTR, [])
    for param in params:
        param.requires_grad_(False)
        frozen.append(param)
    object.__setattr__(model, _ATTR, frozen)


def release_frozen(model: nn.Module, params: Iterable[nn.Parameter]) -> None:
    """Take ``params`` off the record (they are trainable on purpose; ``unload`` leaves them)."""
    frozen = getattr(model, _ATTR, None)
    if frozen is not None:
        ids = {id(p) for p in params}
        frozen[:] = [p for p in frozen if id(p) not in ids]


def forget_frozen(model: nn.Module) -> list[nn.Parameter]:
    """Drop the record and return it (the model is plain again)."""
    frozen = getattr(model, _ATTR, [])
    if hasattr(model, _ATTR):
        object.__delattr__(model, _ATTR)
    return frozen
