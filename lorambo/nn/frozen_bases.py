"""Warn when an optimizer trains no adapter: it steps base weights lorambo froze and no LoRA pool.

An optimizer built before ``configure_model`` holds the model's old parameters. Wrapping a layer
freezes its base weight, and the LoRA pools that now train are new parameters the optimizer does
not hold, so its steps leave every adapter at its start and the loss does not move, without an
error. The optimizer step post-hook of :mod:`lorambo.nn.optimizer_tracking` calls
:func:`warn_if_trains_no_adapter` when it scans an optimizer's parameters (its first step, and
after ``add_param_group``).
"""

from __future__ import annotations

from collections.abc import Iterable

from torch.utils.weak import WeakIdKeyDictionary

from lorambo.nn.slots import pool_slots
from lorambo.user_warnings import warn_user

__all__ = ["note_frozen", "warn_if_trains_no_adapter"]

_FROZEN = WeakIdKeyDictionary()  # base parameter a LoRAMBoLinear froze -> True


def note_frozen(params: Iterable) -> None:
    """Remember ``params`` as base weights a LoRAMBoLinear froze."""
    for param in params:
        _FROZEN[param] = True


def warn_if_trains_no_adapter(optimizer, params: list) -> None:
    """Warn if ``params`` (all of ``optimizer``'s) hold no LoRA pool but frozen base weights."""
    if any(pool_slots(p) is not None for p in params):
        return
    frozen = sum(1 for p in params if not p.requires_grad and p in _FROZEN)
    if frozen:
        name = f"{type(optimizer).__module__}.{type(optimizer).__name__}"
        warn_user(
            f"{name} holds {frozen} of the base weights that lorambo froze when it adapted their layers, "
            "and none of the LoRA pools (lora_A / lora_B): its steps train no adapter. An optimizer built "
            "before configure_model (or load_adapter, import_peft) holds the model's old parameters; build "
            "it afterwards, from [p for p in model.parameters() if p.requires_grad].",
            UserWarning)
