"""Warn when a rank change leaves an optimizer's state behind.

A rank change edits the state of the changed slots only in the optimizer it is given
(``optimizer=``). Without it, another optimizer that holds state for the pools keeps it at the
old slots: moved slots leave their state behind and new slots inherit a dropped slot's
moments (the dropped slots themselves stay zero: lorambo/nn/inactive_slots.py). lorambo
cannot see which optimizers hold a parameter, so a process-wide optimizer step post-hook (installed with the
first LoRAMBoLinear) remembers the optimizers that stepped pool parameters; a rank change warns,
once per optimizer, when one of them that it was not given holds state for the layer's pools.
The same scan warns about an optimizer that holds no pool of a layer in place, or that trains
base weights lorambo froze (see lorambo.nn.frozen_bases).
"""

from __future__ import annotations

from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.weak import WeakIdKeyDictionary

from lorambo.nn.frozen_bases import records_version, warn_if_trains_no_adapter, warn_if_trains_thawed_bases
from lorambo.nn.optimizer_argument import each_optimizer
from lorambo.nn.slots import pool_slots
from lorambo.user_warnings import warn_user

__all__ = ["StaleOptimizerStateWarning", "track_optimizers", "warn_if_state_left_behind", "stand_in_for", "LOAD_IT",
           "REBUILD_IT"]


class StaleOptimizerStateWarning(UserWarning):
    """A rank change left an optimizer's state at the old slots (it was not passed the optimizer)."""


# optimizers are keys by identity: one that defines __eq__ without __hash__ (a dataclass) is still
# tracked, and two that compare equal are still two optimizers
_HOLDERS = WeakIdKeyDictionary()            # pool parameter -> {optimizer that stepped it: True}
_SCANNED = WeakIdKeyDictionary()            # optimizer -> (its parameter count, records_version()) when last scanned
_WARNED = WeakIdKeyDictionary()             # optimizer -> True once warned about
_ORIGINALS = WeakIdKeyDictionary()          # stand-in pool parameter -> the parameter optimizers hold
_installed = False


def track_optimizers() -> None:
    """Install the step post-hook (once per process)."""
    global _installed
    if not _installed:
        register_optimizer_step_post_hook(_after_step)
        _installed = True


def _after_step(optimizer, args, kwargs) -> None:
    groups = getattr(optimizer, "param_groups", None) or ()
    # rescanned only when add_param_group added parameters or an unload removed layers
    scanned = (sum(len(group["params"]) for group in groups), records_version())
    if _SCANNED.get(optimizer) == scanned:
        return
    _SCANNED[optimizer] = scanned
    params = [param for group in groups for param in group["params"]]
    for param in params:
        if pool_slots(param) is not None:
            _HOLDERS.setdefault(param, WeakIdKeyDictionary())[optimizer] = True
    warn_if_trains_no_adapter(optimizer, params)
    warn_if_trains_thawed_bases(optimizer, params)


def stand_in_for(stand_in, original) -> None:
    """Rank changes of a layer whose pool is ``stand_in`` (a gathered copy of a sharded pool, see
    lorambo.integrations.fsdp) check the optimizers that hold ``original``."""
    _ORIGINALS[stand_in] = original


_PASS_IT = ("Pass optimizer=<that {name}> (or a list of every optimizer that steps the pools) to the call that "
            "changes ranks (LoRAMBoLinear.set_rank / keep_components, keep_components_many, configure_model, "
            "LoRAMBoOptimizer.configure / step / update_ranks, ALoRA.step, the growth schedules' step / update), "
            "or build a new optimizer after the change.")
# load_state_dict takes no optimizer: the state saved with the loaded one is the remedy
LOAD_IT = ("Load that {name}'s state saved with this state_dict next (its load_state_dict), or build a new "
           "optimizer after loading.")
REBUILD_IT = "Build a new optimizer for the new components."


def warn_if_state_left_behind(layer, optimizer, change: str, remedy: str = _PASS_IT) -> None:
    """Warn if an optimizer other than ``optimizer`` (one optimizer, or a tuple of them) holds
    state for ``layer``'s pools. ``remedy``: what to do instead, ``{name}`` the optimizer's class."""
    if not _HOLDERS:  # no optimizer has stepped a pool yet (configure_model's rank changes)
        return
    # lorambo.integrations.fsdp's view stands in for the optimizer it names
    given = {id(getattr(o, "stands_in_for", o)) for o in each_optimizer(optimizer)}
    for param in (layer.lora_A, layer.lora_B):
        param = _ORIGINALS.get(param, param)
        for holder in list(_HOLDERS.get(param, {}).keys()):
            if id(holder) in given or holder in _WARNED or not holder.state.get(param):
                continue
            _WARNED[holder] = True
            name = type(holder).__name__
            warn_user(
                f"{layer._label}: {change} without its optimizer, but a {type(holder).__module__}.{name} "
                "holds state for its pools; that state stays at the old slots (moved slots leave it "
                f"behind, new slots inherit a dropped slot's). {remedy.format(name=name)} "
                "Warned once per optimizer.",
                StaleOptimizerStateWarning)
