"""Refuse to load an adapter into modules on the meta device.

A meta tensor holds no data: ``copy_`` into it is a no-op, so the adapter's values would be
dropped without a word, and after ``to_empty`` the pools would hold whatever the memory held.
The loaders check every destination before they change anything.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from lorambo.nn.lora_linear import LoRAMBoLinear

__all__ = ["refuse_meta_destinations"]


def _pool_destinations(module: nn.Module):
    # a bare Linear/Conv1D gets its pools on its weight's device when it is configured
    if isinstance(module, LoRAMBoLinear):
        return (("lora_A", module.lora_A), ("lora_B", module.lora_B))
    return (("weight", module.weight),)


def refuse_meta_destinations(model: nn.Module, layer_names: Iterable[str], module_names: Iterable[str],
                             where: str) -> None:
    """ValueError naming the first LoRA layer (``layer_names``) or module to save
    (``module_names``) of ``model`` whose values would land on the meta device."""
    found = [(f"layer {name!r}", what, t) for name in layer_names
             for what, t in _pool_destinations(model.get_submodule(name))]
    found += [(f"module to save {name!r}", what, t) for name in module_names
              for what, t in model.get_submodule(name).state_dict(keep_vars=True).items()]
    for label, what, tensor in found:
        if tensor is not None and tensor.device.type == "meta":
            raise ValueError(f"{where}: {label} has its {what} on the meta device, which holds no data, so the "
                             "adapter's values would be dropped; materialise the model first "
                             "(model.to_empty(device=...) and load its weights), then load the adapter")
