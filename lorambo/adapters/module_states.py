"""Loading saved states into several modules (the modules to save) all or nothing."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

__all__ = ["load_module_states"]


@torch.no_grad()
def load_module_states(model: nn.Module, states: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
    """``model.get_submodule(name).load_state_dict(state, strict=True)`` for every ``{name: state}``;
    if one fails (a load hook of the user's, out of memory, Ctrl-C) the modules already loaded
    get their old values back, copied into the same tensors (``load_state_dict`` copies in place)."""
    done: list[tuple[dict, dict]] = []
    try:
        for name, state in states.items():
            module = model.get_submodule(name)
            tensors = {k: v for k, v in module.state_dict(keep_vars=True).items() if torch.is_tensor(v)}
            old = {k: v.detach().clone() for k, v in tensors.items()}
            done.append((tensors, old))
            module.load_state_dict(state, strict=True)
    except BaseException:
        for tensors, old in reversed(done):
            for key, value in tensors.items():
                value.detach().copy_(old[key])
        raise
