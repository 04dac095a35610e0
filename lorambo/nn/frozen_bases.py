"""Warn when an optimizer trains no adapter (it steps base weights lorambo froze and no LoRA pool),
or trains base weights lorambo froze that require grad again.

An optimizer built before ``configure_model`` holds the model's old parameters. Wrapping a layer
freezes its base weight, and the LoRA pools that now train are new parameters the optimizer does
not hold, so its steps leave every adapter at its start and the loss does not move, without an
error. The optimizer step post-hook of :mod:`lorambo.nn.optimizer_tracking` calls
:func:`warn_if_trains_no_adapter` when it scans an optimizer's parameters (its first step, and
after ``add_param_group``, and after every ``lorambo.unload``).

``lorambo.unload`` takes its layers' base weights off the record (the model is plain again, and
an optimizer over its frozen weights, as in a head-only run after a LoRA run in the same
process, trains what it was meant to) and records their pools as removed: an optimizer that
holds only removed pools (built before ``unload`` and a new ``configure_model``, as in a
merge-and-restart schedule or a notebook's next experiment) trains no adapter either. So does an
optimizer that holds only pools a layer no longer holds because a new Parameter took their place
(``load_state_dict(..., assign=True)``, an assignment ``layer.lora_A = nn.Parameter(...)``).

A frozen base that requires grad again is trained by an optimizer built from the parameters that
require grad: ``layer.requires_grad_(True)``, the usual way to unfreeze a layer frozen for a
phase, sets it on the base layer's weight and bias too. Adapter files (``save_adapter``,
``export_peft``) hold the adapter alone, so what the base learns is lost there:
:func:`warn_if_trains_thawed_bases` says so at the optimizer's first step.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch.utils.weak import WeakIdKeyDictionary

from lorambo.nn.slots import pool_slots
from lorambo.user_warnings import warn_user

__all__ = ["note_frozen", "forget_noted", "note_unloaded", "note_pool_replaced", "records_version",
           "warn_if_trains_no_adapter", "warn_if_trains_thawed_bases"]

_FROZEN = WeakIdKeyDictionary()  # base parameter a LoRAMBoLinear froze -> how warnings name that layer
_REMOVED = WeakIdKeyDictionary()  # pool parameter no layer holds -> "unloaded" or "replaced"
_version = 0  # bumped by every unload and replaced pool, so that optimizers are checked again at their next step


def note_frozen(params: Iterable, owner: str = "a LoRAMBoLinear") -> None:
    """Remember ``params`` as base weights that the LoRAMBoLinear ``owner`` (its label) froze."""
    for param in params:
        _FROZEN[param] = owner


def forget_noted(params: Iterable) -> None:
    """Take ``params`` off the record (their layer is gone: unloaded, or never placed)."""
    for param in params:
        _FROZEN.pop(param, None)


def note_unloaded(layer) -> None:
    """``layer`` (a LoRAMBoLinear) was taken out of its model: its base weights are no adapter's
    frozen base any more, and its pools train nothing there."""
    global _version
    forget_noted(layer.base_layer.parameters())
    for pool in (layer.lora_A, layer.lora_B):
        _REMOVED[pool] = "unloaded"
    _version += 1


def note_pool_replaced(old, new) -> None:
    """A layer's pool Parameter ``old`` was replaced by ``new`` (a Parameter object set in its
    place): an optimizer that holds only ``old`` trains nothing. ``new`` may be one set back."""
    global _version
    _REMOVED.pop(new, None)
    if old is not None and old is not new:
        _REMOVED[old] = "replaced"
        _version += 1


def records_version() -> int:
    """Changes whenever :func:`note_unloaded` records a layer or :func:`note_pool_replaced` a pool."""
    return _version


def warn_if_trains_no_adapter(optimizer, params: list) -> None:
    """Warn if ``params`` (all of ``optimizer``'s) hold no LoRA pool of a layer still in place but
    frozen base weights or the pools of unloaded layers."""
    if any(pool_slots(p) is not None and p not in _REMOVED for p in params):
        return
    name = f"{type(optimizer).__module__}.{type(optimizer).__name__}"
    removed = sum(1 for p in params if p in _REMOVED)
    replaced = sum(1 for p in params if _REMOVED.get(p) == "replaced")
    if replaced:
        warn_user(
            f"{name} holds {replaced} LoRA pools (lora_A / lora_B) that their layers no longer hold, and none of "
            "the pools in place: its steps train no adapter. A new Parameter took each one's place "
            "(load_state_dict(..., assign=True) puts the state_dict's tensors in the model); build the optimizer "
            "after the load, from [p for p in model.parameters() if p.requires_grad], or load without assign=True, "
            "which copies into the pools the optimizer holds.",
            UserWarning)
        return
    if removed:
        warn_user(
            f"{name} holds {removed} LoRA pools (lora_A / lora_B) of layers that lorambo.unload took out of "
            "their model, and none of the pools in place: its steps train no adapter. An optimizer built "
            "before unload and a new configure_model holds the old pools; build a new one after "
            "configure_model, from [p for p in model.parameters() if p.requires_grad].",
            UserWarning)
        return
    frozen = sum(1 for p in params if not p.requires_grad and p in _FROZEN)
    if frozen:
        warn_user(
            f"{name} holds {frozen} of the base weights that lorambo froze when it adapted their layers, "
            "and none of the LoRA pools (lora_A / lora_B): its steps train no adapter. An optimizer built "
            "before configure_model (or load_adapter, import_peft) holds the model's old parameters; build "
            "it afterwards, from [p for p in model.parameters() if p.requires_grad].",
            UserWarning)


def warn_if_trains_thawed_bases(optimizer, params: list) -> None:
    """Warn if ``params`` (all of ``optimizer``'s) hold base weights a LoRAMBoLinear froze that
    require grad again."""
    thawed = [p for p in params if p.requires_grad and p in _FROZEN]
    if thawed:
        owners = list(dict.fromkeys(_FROZEN[p] for p in thawed))
        warn_user(
            f"{type(optimizer).__module__}.{type(optimizer).__name__} trains {len(thawed)} base weights that lorambo "
            f"froze and that require grad again, of {', '.join(owners[:3])}{' ...' if len(owners) > 3 else ''}: "
            "layer.requires_grad_(True) (or the model's) turns a LoRAMBoLinear's base layer back on with its pools. "
            "save_adapter and export_peft write the adapter alone, so what these weights learn is lost there. "
            "To unfreeze a layer's adapter alone: layer.lora_A.requires_grad_(True), "
            "layer.lora_B.requires_grad_(True) (or layer.base_layer.requires_grad_(False) afterwards).",
            UserWarning)
