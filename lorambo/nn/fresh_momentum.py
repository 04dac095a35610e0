"""SGD momentum buffers of slots that become active.

``torch.optim.SGD`` starts a parameter's momentum buffer at its first update direction ``d``
(the gradient, negated with ``maximize``, plus ``weight_decay * p``): ``buf = d``; later
``buf = momentum * buf + (1 - dampening) * d``. A slot that becomes active inside a buffer that
already exists gets a zero buffer, so its first step would use ``(1 - dampening) * d``.

The new slots are therefore recorded with their pool parameter, and just before the next SGD
step that sees the pool's gradient their buffer is set to ``dampening / momentum * d``, which
that step turns into ``d``: a fresh SGD's start (to rounding). The record follows the slots
through ``keep_components`` and is honoured by whichever SGD steps the parameter next, also one
rebuilt from ``optimizer.state_dict()`` in between; the layer keeps a copy of it, so a deep copy
or pickle of the layer (with its optimizer) taken in between records the copy's pools
(:func:`restore_new_slots`); and one stepped by a ``GradScaler``: a
fused SGD gets the gradients still scaled (the buffer is set from them unscaled), and a step
the scaler skips for an overflow leaves the record for the next step. With ``dampening == 0``
(nesterov's only setting) zero already is that start and nothing is recorded.

A record can outlive a checkpoint taken at a step boundary: a pool that gets no gradient (frozen
for a phase) keeps its slots waiting. So ``optimizer.state_dict()`` of an SGD that holds a
waiting pool carries its slots in that pool's state (``lorambo_new_slots``; torch's SGD ignores
the key), and an SGD that loaded such state into other Parameter objects (a resume into a fresh
model) records them at its next step, before it starts any buffer. torch keeps no state_dict hook
across a deep copy or a rebuild of the optimizer, so one that has neither stepped nor been given
to a rank change since does not save the records.
"""

from __future__ import annotations

import weakref

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils.weak import WeakIdKeyDictionary

from lorambo.nn.optimizer_kind import group_of, optimizer_kind
from lorambo.nn.slots import pool_slots
from lorambo.user_warnings import warn_user

__all__ = ["install_fresh_momentum", "take_loaded_records", "mark_new_slots", "move_new_slots", "restore_new_slots", "new_slots_now",
           "put_back_new_slots"]

_PENDING = WeakIdKeyDictionary()  # pool parameter -> (slot_dim, slots whose buffer starts next step)
_installed = False
_WARNED_ZERO_START = weakref.WeakSet()  # optimizers told that FSDP's new slots start at zero
_POOLS = (("lora_A", 0), ("lora_B", 1))  # pool name, slot dim
_ON_LAYER = "_fresh_momentum_slots"  # the layer's {pool name: the same set of slots _PENDING holds}
SAVED_KEY = "lorambo_new_slots"  # a pool's waiting slots in an SGD's state_dict
_SAVING = weakref.WeakSet()  # SGDs whose state_dict adds the waiting slots of their pools
_LOADED_STATE_SEEN = weakref.WeakKeyDictionary()  # SGD -> the state dict it was last read for SAVED_KEY


def install_fresh_momentum() -> None:
    """The process-wide SGD step pre-hook, which also takes in records a loaded state_dict brings
    (a new layer installs it, so a resumed process has it before its first step)."""
    _install()


def _install() -> None:
    global _installed
    if not _installed:
        register_optimizer_step_pre_hook(_start_buffers)
        _installed = True


def _needs_start(optimizer, param) -> bool:
    group = group_of(optimizer, param)
    if group is None or not group.get("momentum") or not group.get("dampening"):
        return False
    return torch.is_tensor((optimizer.state.get(param) or {}).get("momentum_buffer"))


def mark_new_slots(optimizer, layer, slots) -> None:
    """Record ``slots`` of ``layer``'s pools as new to a ``torch.optim.SGD`` with momentum and
    dampening (no-op for any other optimizer)."""
    if not issubclass(optimizer_kind(optimizer), torch.optim.SGD) or not slots:
        return
    for name, dim in _POOLS:
        param = getattr(layer, name)
        if not _needs_start(optimizer, param):
            continue
        if hasattr(optimizer, "optimizer_type"):  # FSDP's gathered pools are not the ones stepped
            real = getattr(optimizer, "stands_in_for", optimizer)
            if real not in _WARNED_ZERO_START:  # the same for every layer and decision: once
                _WARNED_ZERO_START.add(real)
                warn_user(f"{layer._label}: SGD with dampening > 0 through lorambo.integrations.fsdp: "
                          "the momentum buffers of new slots start at zero, so their first step is "
                          "(1 - dampening) times a fresh SGD's (in every layer; warned once per optimizer)")
            return
        _install()
        _save_records_with(optimizer)
        pending = layer.__dict__.setdefault(_ON_LAYER, {}).setdefault(name, set())
        pending.update(int(s) for s in slots)
        loaded = _PENDING.get(param)
        if loaded is not None and loaded[1] is not pending:  # slots a loaded state_dict brought
            pending.update(loaded[1])
        _PENDING[param] = (dim, pending)


def _save_records_with(optimizer) -> None:
    if optimizer not in _SAVING:
        _SAVING.add(optimizer)
        optimizer.register_state_dict_post_hook(_add_waiting_slots)


def _add_waiting_slots(optimizer, state_dict: dict) -> dict:
    """``state_dict`` with the waiting slots of the optimizer's pools in their (copied) state."""
    if not _PENDING:
        return state_dict
    index = 0
    for group in optimizer.param_groups:  # torch numbers the parameters across groups in this order
        for param in group["params"]:
            record = _PENDING.get(param)
            saved = state_dict["state"].get(index)
            if record and record[1] and saved is not None and torch.is_tensor(saved.get("momentum_buffer")):
                # a copy: torch's state_dict shares each parameter's state dict with the live one
                # a list, not a tensor: a [capacity] tensor would pass for per-slot state
                # (lorambo.ext.ops.slot_state_tensors) that rank changes reset and move
                state_dict["state"][index] = {**saved, SAVED_KEY: sorted(record[1])}
            index += 1
    return state_dict


def take_loaded_records(optimizer) -> None:
    """Record the slots a loaded state_dict says are waiting (load_state_dict gives the optimizer a
    new ``state`` dict, so it is read once per load): at its next step, or at a rank change given
    the optimizer before that, which then moves or resets them."""
    if not isinstance(optimizer, torch.optim.SGD):
        return
    state = optimizer.state
    if _LOADED_STATE_SEEN.get(optimizer) is state:
        return
    _LOADED_STATE_SEEN[optimizer] = state
    for param, param_state in state.items():
        saved = param_state.pop(SAVED_KEY, None) if isinstance(param_state, dict) else None
        tag = pool_slots(param)
        if saved is None or tag is None:
            continue
        _save_records_with(optimizer)
        dim, pending = _PENDING.get(param, (tag[1], set()))
        pending.update(int(s) for s in saved)
        _PENDING[param] = (dim, pending)


def move_new_slots(layer, keep) -> None:
    """Follow :meth:`LoRAMBoLinear.keep_components`: slot ``keep[j]`` becomes slot ``j``; the
    slots not kept are dropped."""
    if not _PENDING:
        return
    where = {int(s): j for j, s in enumerate(keep)}
    for param in (layer.lora_A, layer.lora_B):
        if param in _PENDING:
            slots = _PENDING[param][1]
            moved = {where[s] for s in slots if s in where}
            slots.clear()  # in place: the layer's copy is this set
            slots.update(moved)


def new_slots_now(layer) -> dict[str, set[int]]:
    """A copy of the slots of ``layer``'s pools waiting for their first SGD step, by pool name."""
    return {name: set(slots) for name, slots in layer.__dict__.get(_ON_LAYER, {}).items()}


def put_back_new_slots(layer, kept: dict[str, set[int]]) -> None:
    """Make the waiting slots those of :func:`new_slots_now`'s ``kept`` again (in the same sets)."""
    for name, slots in layer.__dict__.get(_ON_LAYER, {}).items():
        slots.clear()
        slots.update(kept.get(name, ()))


def restore_new_slots(layer) -> None:
    """Record the slots ``layer`` (a deep copy or unpickled layer, whose pools are new Parameter
    objects) still had waiting for their first SGD step when it was copied."""
    for name, dim in _POOLS:
        slots = layer.__dict__.get(_ON_LAYER, {}).get(name)
        if slots:
            _install()
            _PENDING[getattr(layer, name)] = (dim, slots)


def _start_buffers(optimizer, args, kwargs) -> None:
    if not isinstance(optimizer, torch.optim.SGD):  # the common case: O(1), and before no_grad,
        return  # whose entry and exit cost more than this test at every step
    take_loaded_records(optimizer)
    if _PENDING:
        _save_records_with(optimizer)  # a copy or rebuild of the SGD that marked them: slots it skips keep waiting
        _start_pending(optimizer)


@torch.no_grad()
def _start_pending(optimizer) -> None:
    # A GradScaler steps a fused SGD with the gradients still scaled, handing it the scale and
    # whether they overflowed as attributes; the fused kernel unscales them, or skips the step
    grad_scale, found_inf = getattr(optimizer, "grad_scale", None), getattr(optimizer, "found_inf", None)
    if found_inf is not None and bool(found_inf):  # a skipped step: the slots wait for the next one
        return
    # The optimizer's own parameters are looked up; the records of every model in the process are
    # never iterated, since another thread (training its own model) may add to them meanwhile
    for group in optimizer.param_groups:
        for param in group["params"]:
            if param.grad is None:  # not stepped by this SGD now: its slots wait
                continue
            record = _PENDING.pop(param, None)
            if record is None:
                continue
            dim, slots = record
            started = sorted(slots)
            slots.clear()  # the layer's copy too: a copy of it taken from now on has none waiting
            if started and _needs_start(optimizer, param):
                _start_slots(optimizer, group, param, dim, started, grad_scale)


def _start_slots(optimizer, group: dict, param, dim: int, slots: list[int], grad_scale) -> None:
    """Set the momentum buffer of ``slots`` to ``dampening / momentum * d`` (see the module doc)."""
    index = torch.tensor(slots, dtype=torch.long, device=param.device)
    d = param.grad.index_select(dim, index)
    if grad_scale is not None:
        d = d / grad_scale.to(d.device)
    d = -d if group["maximize"] else d
    if group["weight_decay"]:
        d = d + group["weight_decay"] * param.index_select(dim, index)
    buf = optimizer.state[param]["momentum_buffer"]
    buf.index_copy_(dim, index, (d * (group["dampening"] / group["momentum"])).to(buf.dtype))
