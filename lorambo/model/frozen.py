"""The parameters lorambo froze in a model, so that ``unload`` can make them trainable again.

``configure_model`` freezes every parameter that is not LoRA and records it here; modules to
save are taken off the record (they train on purpose); ``unload`` re-enables what is left. The
record is a plain attribute of the model: never state, never a submodule, so it reaches no
state_dict or checkpoint.

The record names each parameter by where it lives, ``(module, attribute name)``, not by the
Parameter object: ``to_empty`` (meta-device construction), ``load_state_dict(assign=True)`` and
conversions that are not in place put new Parameter objects into the same modules, and
``unload`` must re-enable those.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

__all__ = ["frozen_by_lorambo", "record_frozen", "release_frozen", "forget_frozen"]

_ATTR = "_lorambo_frozen_params"  # [(module, parameter name)]


def _live(slots) -> list[nn.Parameter]:
    """The Parameters the recorded places hold now, each once, in record order."""
    out: dict[int, nn.Parameter] = {}
    for module, name in slots:
        param = module._parameters.get(name)
        if param is not None:
            out.setdefault(id(param), param)
    return list(out.values())


def frozen_by_lorambo(model: nn.Module) -> list[nn.Parameter]:
    """The parameters lorambo froze and ``unload`` would re-enable (a copy; [] when none)."""
    return _live(getattr(model, _ATTR, []))


def record_frozen(model: nn.Module, params: Iterable[nn.Parameter]) -> None:
    """Freeze ``params`` (parameters of ``model``) and add their places to the record."""
    ids = set()
    for param in params:
        param.requires_grad_(False)
        ids.add(id(param))
    frozen = getattr(model, _ATTR, [])
    known = {(id(m), n) for m, n in frozen}
    for module in model.modules():
        for name, param in module._parameters.items():
            if param is not None and id(param) in ids and (id(module), name) not in known:
                frozen.append((module, name))
    object.__setattr__(model, _ATTR, frozen)


def release_frozen(model: nn.Module, params: Iterable[nn.Parameter]) -> None:
    """Take ``params`` off the record (they are trainable on purpose; ``unload`` leaves them)."""
    frozen = getattr(model, _ATTR, None)
    if frozen is not None:
        ids = {id(p) for p in params}
        frozen[:] = [(m, n) for m, n in frozen if id(m._parameters.get(n)) not in ids]


def forget_frozen(model: nn.Module) -> list[nn.Parameter]:
    """Drop the record and return the parameters it names (the model is plain again)."""
    # the model's own attribute: a torch.compile wrapper's getattr also finds its inner model's
    frozen = _live(model.__dict__.get(_ATTR, []))
    model.__dict__.pop(_ATTR, None)
    return frozen
