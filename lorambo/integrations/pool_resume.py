"""Trainer resume: the pools and modules_to_save from the checkpoint's own adapter file when
Trainer's model checkpoint did not restore them.

Trainer reloads ``model.safetensors`` with ``load_state_dict(strict=False)``, under the keys
``save_pretrained`` wrote. transformers 5 writes some architectures in their original checkpoint
format (ViT's ``vit.layers.0.attention.q_proj`` as ``vit.encoder.layer.0.attention.attention.query``,
Mixtral's experts, GPT-NeoX's ``embed_out``): none of those keys loads back, so the adapted layers'
``lora_A`` / ``lora_B`` / ``_extra_state`` keep the values the rebuilt model started with, and
training goes on from an untrained adapter with only Trainer's "missing keys" log line. The
frozen base is the rebuilt model's anyway; ``adapter.safetensors``, which ``LoRAMBoCallback``
writes beside every checkpoint under lorambo's own names, holds the rest.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from lorambo.adapters.extra_modules import PREFIX
from lorambo.adapters.format import read_adapter_file
from lorambo.adapters.io import adapter_file, load_adapter
from lorambo.model import lora_layers
from lorambo.model.unwrap import unwrap_model

__all__ = ["restore_missed_adapter"]


def _differs(model: nn.Module, meta: dict, tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the layers and modules to save whose state is not the file's."""
    layers = lora_layers(model)
    differ = []
    for name, info in meta.items():
        layer = layers.get(name)
        if layer is None or layer.rank != info["rank"]:
            differ.append(name)
            continue
        r = layer.rank
        a, b = tensors[f"{name}.lora_A"], tensors[f"{name}.lora_B"]
        if not (torch.equal(layer.lora_A[:r].detach().cpu(), a) and torch.equal(layer.lora_B[:, :r].detach().cpu(), b)):
            differ.append(name)
    states: dict[str, dict] = {}
    for key, value in tensors.items():
        if key.startswith(PREFIX):
            module, _, state_key = key[len(PREFIX):].partition("::")
            if module not in states:
                states[module] = _module_state(model, module)
            held = states[module].get(state_key)
            if (held is None or not torch.equal(held.detach().cpu(), value)) and module not in differ:
                differ.append(module)
    return differ


def _module_state(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """The state of ``model``'s submodule ``name``; empty when the model has none of that name
    (then it differs, and ``load_adapter`` refuses the file naming it)."""
    try:
        return model.get_submodule(name).state_dict()
    except AttributeError:
        return {}


def restore_missed_adapter(model: nn.Module, folder: str | os.PathLike) -> list[str]:
    """Load ``folder``'s ``adapter.safetensors`` into ``model`` when the model's pools, ranks or
    modules_to_save are not the file's; returns the names that differed (empty: nothing done, or
    no adapter file in ``folder``). A file that does not fit the model (other targets or
    capacities) raises ``load_adapter``'s ValueError, before anything is written."""
    file = adapter_file(folder)
    if not file.is_file():
        return []
    meta, tensors, _ = read_adapter_file(file)
    differ = _differs(unwrap_model(model), meta, tensors)  # the file names the plain model's modules
    if differ:
        load_adapter(model, file)
    return differ
