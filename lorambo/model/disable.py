"""``disable_adapter(model)``: run the frozen base model, e.g. as the reference model of DPO.

Inside the context every LoRAMBoLinear calls its base layer directly (no LoRA branch, no
gradient to the pools) and every module in modules_to_save is replaced by a frozen copy holding
its original state. Everything is put back on exit, also after an exception. Merged layers are
refused: their base weight holds the adapter.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from lorambo.model.argument import require_module
from lorambo.model.configure import _set_submodule, lora_layers
from lorambo.model.modules_to_save import modules_to_save, original_state

__all__ = ["disable_adapter", "refuse_inside_disable_adapter"]


def _frozen_original(name: str, trained: nn.Module, original: dict) -> nn.Module:
    """A frozen copy of ``trained`` holding ``original``. Its parameters are the recorded original
    tensors themselves (moved only if the model changed device or dtype since), not copies of the
    trained ones and their gradients that ``load_state_dict`` would then overwrite: a reference
    pass every step with a large head (lm_head) would copy it, and its gradient, every step."""
    memo = {}
    for key, param in trained.named_parameters(remove_duplicate=False):
        if key in original and original[key].shape != param.shape:
            # resized since (resize_token_embeddings on a head to save): the original has no
            # values for the new rows, and the copy would compute with the old shape
            raise RuntimeError(f"disable_adapter: {name}.{key} is now {list(param.shape)}, but its state recorded "
                               f"by configure_model is {list(original[key].shape)} (resized since, by "
                               "resize_token_embeddings, say); the base model's module has no such shape. "
                               "Resize before configure_model")
        if key in original and id(param) not in memo:
            value = original[key].to(device=param.device, dtype=param.dtype)
            memo[id(param)] = nn.Parameter(value, requires_grad=False)
    frozen = copy.deepcopy(trained, memo)
    params = dict(trained.named_parameters(remove_duplicate=False))
    frozen.load_state_dict({k: v for k, v in original.items() if k not in params}, strict=False)  # buffers
    frozen.requires_grad_(False)
    return frozen


def refuse_inside_disable_adapter(model: nn.Module, who: str) -> None:
    """RuntimeError from ``who`` (an adapter file's writer or reader) while ``disable_adapter`` is
    active on ``model`` and it has modules_to_save: those are then the frozen copies of their state
    before configure_model, so a save would write the untrained heads, and a load would fill the
    copies that the exit drops, leaving the trained heads as they were beside the loaded pools."""
    heads = modules_to_save(model)
    if heads and any(layer.adapter_disabled for layer in lora_layers(model).values()):
        raise RuntimeError(f"{who}: called inside lorambo.disable_adapter, where the modules_to_save "
                           f"{sorted(heads)[:4]} are frozen copies of their state before configure_model, "
                           "not the trained modules; call it after the with-block")


@contextmanager
def disable_adapter(model: nn.Module) -> Iterator[nn.Module]:
    """``with disable_adapter(model):`` runs the frozen base model: no LoRA branch, and the
    ``modules_to_save`` in their state from before ``configure_model``. Everything is back on
    exit. RuntimeError for merged layers (``unmerge()`` first) and for nested use."""
    require_module(model, "disable_adapter")
    layers = lora_layers(model)
    merged = [n for n, layer in layers.items() if layer.merged]
    if merged:
        raise RuntimeError(f"disable_adapter: layers {merged[:4]} are merged; unmerge() them first")
    busy = [n for n, layer in layers.items() if layer.adapter_disabled]
    if busy:
        raise RuntimeError(f"disable_adapter: already active on {busy[:4]} (contexts do not nest)")
    originals = original_state(model)
    heads = {}
    for name in modules_to_save(model):
        heads[name] = _frozen_original(name, model.get_submodule(name), originals[name])
    trained = {name: model.get_submodule(name) for name in heads}
    try:
        for layer in layers.values():
            layer.adapter_disabled = True  # its forward runs the base layer alone
        for name, frozen in heads.items():
            _set_submodule(model, name, frozen)
        yield model
    finally:
        for layer in layers.values():
            layer.__dict__.pop("adapter_disabled", None)  # back to the class default, False
        for name, module in trained.items():
            _set_submodule(model, name, module)
