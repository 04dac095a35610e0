"""SGD momentum buffers of slots that become active.

``torch.optim.SGD`` starts a parameter's momentum buffer at its first update direction ``d``
(the gradient, negated with ``maximize``, plus ``weight_decay * p``): ``buf = d``; later
``buf = momentum * buf + (1 - dampening) * d``. A slot that becomes active inside a buffer that
already exists gets a zero buffer, so its first step would use ``(1 - dampening) * d``.

A rank change given the SGD therefore records the new slots in the SGD's own state of the pool,
``optimizer.state[pool]["lorambo_new_slots"]``: an int whose bit ``s`` is set while slot ``s``
waits for its first step. Just before the next step that sees the pool's gradient (a
process-wide step pre-hook) their buffer is set to ``dampening / momentum * d``, which that step
turns into ``d``: a fresh SGD's start (to rounding); the record is then removed. With
``dampening == 0`` (nesterov's only setting) zero already is that start and nothing is recorded.

Kept in the optimizer's state, the record goes wherever torch takes that state:
``state_dict()`` / ``load_state_dict`` (a resume into a fresh model, whose Parameters are new
objects), a deep copy or pickle of the model together with its optimizer, and
``torch.distributed.checkpoint``'s ``get_optimizer_state_dict`` / ``set_optimizer_state_dict``
(whose flattened form loads only the keys the receiving SGD holds: there the slots start at
``(1 - dampening) * d``). torch's SGD reads only ``momentum_buffer`` of a parameter's state and
keeps the other keys. The record is an int: the flattened form refuses a list, and a
``[capacity]`` tensor would pass for per-slot state (:func:`lorambo.ext.ops.slot_state_tensors`).

A pool that gets no gradient (frozen for a phase) keeps its slots waiting across steps, and so
does a step a ``GradScaler`` skips for an overflow; a fused SGD stepped by a ``GradScaler`` gets
the gradients still scaled (the buffer is set from them unscaled). Rank changes given the SGD
treat the record as they treat the buffer (:mod:`lorambo.nn.optimizer_state`):
``keep_components`` moves the kept slots' bits to the front and clears those of the other slots
it zeroes, ``reset_slot_state`` sets them. A rank change not given the SGD leaves both behind,
and warns (:mod:`lorambo.nn.optimizer_tracking`). Through ``lorambo.integrations.fsdp`` nothing is
recorded (a warning says the new slots start at zero), and a record loaded for a sharded pool is
dropped at its step.
"""

from __future__ import annotations

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils.weak import WeakIdKeyDictionary

from lorambo.nn.optimizer_kind import group_of, optimizer_kind
from lorambo.nn.slots import pool_slots
from lorambo.sharding import is_sharded
from lorambo.user_warnings import warn_user

__all__ = ["install_fresh_momentum", "mark_new_slots", "move_new_slots", "RECORD"]

RECORD = "lorambo_new_slots"  # key of a pool's state in an SGD: bit s set while slot s waits
# An SGD attribute: (its param_groups list, id of its state dict) when its last step left no record.
# load_state_dict replaces both (the list too, so an id the freed old state dict had cannot pass);
# a deep copy or pickle drops the attribute (torch's Optimizer.__getstate__ keeps only its state and
# groups), and a rank change that records slots removes it.
_NONE_WAITING = "_lorambo_none_waiting"
_installed = False
_WARNED_ZERO_START = WeakIdKeyDictionary()  # optimizers (by identity) told that FSDP's new slots start at zero
_POOLS = ("lora_A", "lora_B")


def install_fresh_momentum() -> None:
    """The process-wide SGD step pre-hook (a new layer installs it, so a resumed process has it
    before its first step)."""
    global _installed
    if not _installed:
        register_optimizer_step_pre_hook(_start_waiting_slots)
        _installed = True


def _starts_nonzero(group: dict | None, state: dict | None) -> bool:
    """Whether a slot new to a buffer that exists starts off a fresh SGD's start (dampening > 0)."""
    if group is None or not group.get("momentum") or not group.get("dampening"):
        return False
    return torch.is_tensor((state or {}).get("momentum_buffer"))


def _bits(slots) -> int:
    return sum(1 << s for s in {int(s) for s in slots})


def _slots(bits: int, size: int) -> list[int]:
    """The slots below ``size`` whose bit is set."""
    return [s for s in range(min(bits.bit_length(), size)) if bits >> s & 1]


def mark_new_slots(optimizer, layer, slots) -> None:
    """Record ``slots`` of ``layer``'s pools as new to a ``torch.optim.SGD`` with momentum and
    dampening that holds a momentum buffer for them (no-op for any other optimizer)."""
    if not issubclass(optimizer_kind(optimizer), torch.optim.SGD) or not slots:
        return
    for name in _POOLS:
        param = getattr(layer, name)
        if not _starts_nonzero(group_of(optimizer, param), optimizer.state.get(param)):
            continue
        if hasattr(optimizer, "optimizer_type"):  # FSDP's gathered pools are not the ones stepped
            real = getattr(optimizer, "stands_in_for", optimizer)
            if real not in _WARNED_ZERO_START:  # the same for every layer and decision: once
                _WARNED_ZERO_START[real] = True
                warn_user(f"{layer._label}: SGD with dampening > 0 through lorambo.integrations.fsdp: "
                          "the momentum buffers of new slots start at zero, so their first step is "
                          "(1 - dampening) times a fresh SGD's (in every layer; warned once per optimizer)")
            return
        install_fresh_momentum()
        state = optimizer.state[param]
        state[RECORD] = state.get(RECORD, 0) | _bits(slots)  # a new int: an EditSnapshot keeps the old one
        optimizer.__dict__.pop(_NONE_WAITING, None)


def move_new_slots(optimizer, layer, keep, old_rank: int) -> None:
    """Follow :meth:`LoRAMBoLinear.keep_components` given ``optimizer``: the record of slot
    ``keep[j]`` becomes slot ``j``'s, and the other slots below ``old_rank`` wait no more (their
    state is zeroed, not started); slots from ``old_rank`` on, whose state is not touched, keep theirs."""
    for name in _POOLS:
        state = optimizer.state.get(getattr(layer, name))
        bits = (state or {}).get(RECORD)
        if not bits:
            continue
        moved = sum(1 << j for j, s in enumerate(keep) if bits >> s & 1) | (bits >> old_rank << old_rank)
        if moved:
            state[RECORD] = moved
        else:
            del state[RECORD]


def _start_waiting_slots(optimizer, args, kwargs) -> None:
    if not isinstance(optimizer, torch.optim.SGD):  # the common case: O(1), and before no_grad,
        return  # whose entry and exit cost more than this test at every step
    seen = optimizer.__dict__.get(_NONE_WAITING)
    if seen is not None and seen[0] is optimizer.param_groups and seen[1] == id(optimizer.state):
        return  # nothing recorded since the last step: no walk over the parameters
    if not _start_pending(optimizer):
        optimizer.__dict__[_NONE_WAITING] = (optimizer.param_groups, id(optimizer.state))


@torch.no_grad()
def _start_pending(optimizer) -> bool:
    """Start the buffers of the waiting slots of every pool this step updates; whether any record
    is left (a pool without a gradient now, or a skipped step)."""
    # A GradScaler steps a fused SGD with the gradients still scaled, handing it the scale and
    # whether they overflowed as attributes; the fused kernel unscales them, or skips the step
    grad_scale, found_inf = getattr(optimizer, "grad_scale", None), getattr(optimizer, "found_inf", None)
    if found_inf is not None and bool(found_inf):  # a skipped step: the slots wait for the next one
        return True
    left = False
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state.get(param)
            if not state or RECORD not in state:
                continue
            if param.grad is None:  # not stepped now: its slots wait
                left = True
                continue
            bits, tag = state.pop(RECORD), pool_slots(param)
            # a sharded pool's buffer starts at zero, as through lorambo.integrations.fsdp (docs/interop.md)
            if tag is None or is_sharded(param) or not _starts_nonzero(group, state):
                continue
            dim = tag[1]
            slots = _slots(bits, param.shape[dim])
            if slots:
                _start_slots(group, param, dim, state["momentum_buffer"], slots, grad_scale)
    return left


def _start_slots(group: dict, param, dim: int, buf: torch.Tensor, slots: list[int], grad_scale) -> None:
    """Set the momentum buffer of ``slots`` to ``dampening / momentum * d`` (see the module doc)."""
    index = torch.tensor(slots, dtype=torch.long, device=param.device)
    d = param.grad.index_select(dim, index)
    if grad_scale is not None:
        d = d / grad_scale.to(d.device)
    d = -d if group["maximize"] else d
    if group["weight_decay"]:
        d = d + group["weight_decay"] * param.index_select(dim, index)
    buf.index_copy_(dim, index, (d * (group["dampening"] / group["momentum"])).to(buf.dtype))
