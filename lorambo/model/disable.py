"""``disable_adapter(model)``: run the frozen base model, e.g. as the reference model of DPO.

Inside the context every LoRAMBoLinear calls its base layer directly (no LoRA branch, no
gradient to the pools) and every module in modules_to_save is replaced by a frozen copy holding
its original state. Everything is put back on exit, also after an exception. Merged layers are
refused: their base weight holds the adapter. With modules_to_save, capturing or restoring the
model's state inside the context (``state_dict``, ``load_state_dict``, ``copy.deepcopy``,
pickling) is refused: it would reach the frozen copies instead of the trained modules.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial

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


def _inside_error(who: str, heads) -> RuntimeError:
    return RuntimeError(f"{who}: called inside lorambo.disable_adapter, where the modules_to_save "
                        f"{sorted(heads)[:4]} are frozen copies of their state before configure_model, "
                        "not the trained modules; call it after the with-block")


def refuse_inside_disable_adapter(model: nn.Module, who: str) -> None:
    """RuntimeError from ``who`` (an adapter file's writer or reader) while ``disable_adapter`` is
    active on ``model`` and it has modules_to_save: those are then the frozen copies of their state
    before configure_model, so a save would write the untrained heads, and a load would fill the
    copies that the exit drops, leaving the trained heads as they were beside the loaded pools."""
    heads = modules_to_save(model)
    if heads and any(layer.adapter_disabled for layer in lora_layers(model).values()):
        raise _inside_error(who, heads)


def _refuse(who: str, heads: list[str], *_) -> None:
    raise _inside_error(who, heads)


def _refuse_state_capture(model: nn.Module, heads: dict[str, nn.Module]) -> list:
    """Make ``state_dict``, ``load_state_dict``, ``copy.deepcopy`` and pickling raise while the
    frozen ``heads`` stand in ``model``: a state_dict would hold the untrained heads beside the
    trained pools, a load would write into the recorded originals (the frozen parameters are
    those tensors) and so change every later reference pass, and a copy would keep the frozen
    heads and the disabled layers for good. The heads carry the refusals, so that a call on any
    module holding them refuses; ``model`` also refuses a load, before any module takes a value.
    Returns the handles of ``model``'s hook, for the exit to remove (the heads are dropped). The
    hooks are partials of a module-level function: pickling the model pickles its hooks before
    it reaches the heads, whose own refusal then names the call."""
    names = sorted(heads)
    refuse_state_dict = partial(_refuse, "state_dict", names)
    refuse_load = partial(_refuse, "load_state_dict", names)
    for frozen in heads.values():
        frozen.register_state_dict_pre_hook(refuse_state_dict)
        frozen.register_load_state_dict_pre_hook(refuse_load)
        # copy.deepcopy and pickle look these up on the instance before the class
        frozen.__deepcopy__ = partial(_refuse, "copy.deepcopy", names)
        frozen.__reduce_ex__ = partial(_refuse, "pickling (torch.save of the model)", names)
    return [model.register_load_state_dict_pre_hook(refuse_load)]


@contextmanager
def disable_adapter(model: nn.Module) -> Iterator[nn.Module]:
    """``with disable_adapter(model):`` runs the frozen base model: no LoRA branch, and the
    ``modules_to_save`` in their state from before ``configure_model``. Everything is back on
    exit. RuntimeError for merged layers (``unmerge()`` first) and for nested use; with
    ``modules_to_save``, also for ``state_dict``, ``load_state_dict``, ``copy.deepcopy`` and
    pickling of the model inside the block (they would reach the frozen copies)."""
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
    handles = _refuse_state_capture(model, heads) if heads else []
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
        for handle in handles:
            handle.remove()
