"""modules_to_save in lorambo's adapter file: their whole state, next to the LoRA slices.

Stored as tensors named ``modules_to_save::<module name>::<state key>`` (a prefix no module
name can produce), so a file without them reads exactly as before.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lorambo.adapters.format import AdapterFormatError
from lorambo.adapters.module_states import load_module_states
from lorambo.model.modules_to_save import keep_trainable, modules_to_save

PREFIX = "modules_to_save::"

__all__ = ["PREFIX", "add_modules_to_save", "saved_module_names", "check_modules_to_save",
           "load_modules_to_save", "is_extra_key", "non_finite_parameters"]


def is_extra_key(key: str) -> bool:
    return key.startswith(PREFIX)


def add_modules_to_save(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Add the state of every module to save to ``tensors`` (detached CPU copies)."""
    for name in modules_to_save(model):
        for key, value in model.get_submodule(name).state_dict().items():
            tensors[f"{PREFIX}{name}::{key}"] = value.detach().cpu().contiguous()


def non_finite_parameters(model: nn.Module) -> list[tuple[str, str, torch.Tensor]]:
    """``(module name, parameter name, values)`` of every floating parameter of a module to save
    that holds NaN/inf: what :func:`check_modules_to_save` refuses on load (buffers may hold inf)."""
    return [(name, key, p.detach()) for name in modules_to_save(model)
            for key, p in model.get_submodule(name).named_parameters()
            if p.is_floating_point() and not bool(torch.isfinite(p).all())]


def _split(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if is_extra_key(key):
            name, _, state_key = key[len(PREFIX):].partition("::")
            out.setdefault(name, {})[state_key] = value
    return out


def saved_module_names(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the modules to save stored in a file's tensors (file order)."""
    return list(_split(tensors))


def check_modules_to_save(model: nn.Module, tensors: dict[str, torch.Tensor],
                          file: Path | str) -> dict[str, dict[str, torch.Tensor]]:
    """``{module: state}`` from the file, validated against ``model`` (module exists, same state
    keys and shapes) before anything is written."""
    extra = _split(tensors)
    for name, state in extra.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"adapter {file}: module to save {name!r} is not in "
                             f"{type(model).__name__}") from None
        have = module.state_dict()
        if set(have) != set(state):
            raise ValueError(f"adapter {file}: module to save {name!r} has state keys {sorted(state)} "
                             f"in the file and {sorted(have)} in the model")
        params = dict(module.named_parameters())
        for key, value in state.items():
            if tuple(value.shape) != tuple(have[key].shape):
                raise ValueError(f"adapter {file}: {name}.{key} has shape {tuple(value.shape)} in the "
                                 f"file and {tuple(have[key].shape)} in the model")
            # a trained parameter is never NaN/inf but after a diverged run (buffers may hold inf: masks)
            if key in params and value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise AdapterFormatError(f"{file}: module to save {name!r}: parameter {key!r} contains NaN or inf")
    return extra


@torch.no_grad()
def load_modules_to_save(model: nn.Module, extra: dict[str, dict[str, torch.Tensor]]) -> None:
    """Copy validated states (from :func:`check_modules_to_save`) into the model's modules, which
    become modules to save of the model (trainable) if they were not yet."""
    new = [n for n in extra if n not in modules_to_save(model)]
    keep_trainable(model, new)  # records the original state before it is overwritten
    load_module_states(model, extra)
