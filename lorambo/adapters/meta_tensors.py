"""Refuse to load an adapter into, or save one from, modules on the meta device.

A meta tensor holds no data: ``copy_`` into it is a no-op, so a loaded adapter's values would be
dropped without a word (and after ``to_empty`` the pools would hold whatever the memory held),
and saving one fails inside torch naming no layer. The loaders check every destination before
they change anything; the savers check every source before they write.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from lorambo.nn.lora_linear import LoRAMBoLinear

__all__ = ["refuse_meta_destinations", "refuse_meta_sources"]


def _pool_tensors(module: nn.Module):
    # a bare Linear/Conv1D gets its pools on its weight's device when it is configured
    if isinstance(module, LoRAMBoLinear):
        return (("lora_A", module.lora_A), ("lora_B", module.lora_B))
    return (("weight", module.weight),)


def _first_on_meta(model: nn.Module, layer_names: Iterable[str], module_names: Iterable[str],
                   embedding_names: Iterable[str] = ()):
    """``(what, tensor name)`` of the first LoRA layer, module to save or embedding layer of
    ``model`` with a tensor on the meta device, else None."""
    found = [(f"layer {name!r}", what, t) for name in layer_names
             for what, t in _pool_tensors(model.get_submodule(name))]
    found += [(f"{kind} {name!r}", what, t)
              for kind, names in (("module to save", module_names), ("embedding layer", embedding_names))
              for name in names for what, t in model.get_submodule(name).state_dict(keep_vars=True).items()]
    return next(((label, what) for label, what, t in found
                 if getattr(t, "device", None) is not None and t.device.type == "meta"), None)


def refuse_meta_destinations(model: nn.Module, layer_names: Iterable[str], module_names: Iterable[str],
                             where: str, embedding_names: Iterable[str] = ()) -> None:
    """ValueError naming the first LoRA layer (``layer_names``), module to save
    (``module_names``) or embedding layer a peft adapter holds whole (``embedding_names``) of
    ``model`` whose loaded values would land on the meta device."""
    hit = _first_on_meta(model, layer_names, module_names, embedding_names)
    if hit is not None:
        raise ValueError(f"{where}: {hit[0]} has its {hit[1]} on the meta device, which holds no data, so the "
                         "adapter's values would be dropped; materialise the model first "
                         "(model.to_empty(device=...) and load its weights), then load the adapter")


def refuse_meta_sources(model: nn.Module, layer_names: Iterable[str], module_names: Iterable[str],
                        caller: str) -> None:
    """ValueError naming the first LoRA layer or module to save of ``model`` that ``caller``
    would have to save from the meta device."""
    hit = _first_on_meta(model, layer_names, module_names)
    if hit is not None:
        raise ValueError(f"{caller}: {hit[0]} has its {hit[1]} on the meta device, which holds no data: there is "
                         "nothing to save; materialise and train the model first")
