"""SGD momentum buffers of slots that become active.

``torch.optim.SGD`` starts a parameter's momentum buffer at its first update direction ``d``
(the gradient, negated with ``maximize``, plus ``weight_decay * p``): ``buf = d``; later
``buf = momentum * buf + (1 - dampening) * d``. A slot that becomes active inside a buffer that
already exists gets a zero buffer, so its first step would use ``(1 - dampening) * d``.

The new slots are therefore recorded, and just before the optimizer's next step that sees the
pool's gradient their buffer is set to ``dampening / momentum * d``, which that step turns into
``d``: a fresh SGD's start (to rounding). With ``dampening == 0`` (nesterov's only setting) zero
already is that start and nothing is recorded. The record lives with the optimizer object only:
it is not part of ``optimizer.state_dict()``.
"""

from __future__ import annotations

import warnings
import weakref

import torch
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["mark_new_slots", "move_new_slots"]

# optimizer -> {pool parameter: (slot_dim, set of slots whose buffer starts at their next step)}
_PENDING: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _kind(optimizer) -> type:
    # lorambo.integrations.fsdp's gathered view stands in for the real optimizer and names it
    return getattr(optimizer, "optimizer_type", type(optimizer))


def _group_of(optimizer, param) -> dict | None:
    for group in getattr(optimizer, "param_groups", ()):
        if any(p is param for p in group["params"]):
            return group
    return None


def _needs_start(optimizer, param) -> bool:
    group = _group_of(optimizer, param)
    if group is None or not group.get("momentum") or not group.get("dampening"):
        return False
    return torch.is_tensor((optimizer.state.get(param) or {}).get("momentum_buffer"))


def mark_new_slots(optimizer, layer, slots) -> None:
    """Record ``slots`` of ``layer``'s pools as new to a ``torch.optim.SGD`` with momentum and
    dampening (no-op for any other optimizer)."""
    if not issubclass(_kind(optimizer), torch.optim.SGD) or not slots:
        return
    for param, dim in ((layer.lora_A, 0), (layer.lora_B, 1)):
        if not _needs_start(optimizer, param):
            continue
        if not hasattr(optimizer, "register_step_pre_hook"):  # FSDP's gathered stand-in
            warnings.warn(f"{layer._label}: SGD with dampening > 0 through lorambo.integrations.fsdp: "
                          "the momentum buffers of new slots start at zero, so their first step is "
                          "(1 - dampening) times a fresh SGD's", stacklevel=4)
            return
        if optimizer not in _PENDING:
            _PENDING[optimizer] = WeakIdKeyDictionary()
            optimizer.register_step_pre_hook(_start_buffers)
        _PENDING[optimizer].setdefault(param, (dim, set()))[1].update(int(s) for s in slots)


def move_new_slots(optimizer, layer, keep) -> None:
    """Follow :meth:`LoRAMBoLinear.keep_components`: slot ``keep[j]`` becomes slot ``j``; the
    slots not kept are dropped."""
    pending = _PENDING.get(optimizer) if optimizer is not None else None
    if not pending:
        return
    where = {int(s): j for j, s in enumerate(keep)}
    for param in (layer.lora_A, layer.lora_B):
        if param in pending:
            dim, slots = pending[param]
            pending[param] = (dim, {where[s] for s in slots if s in where})


@torch.no_grad()
def _start_buffers(optimizer, args, kwargs) -> None:
    pending = _PENDING.get(optimizer)
    for param, (dim, slots) in list((pending or {}).items()):
        if param.grad is None:  # SGD skips the parameter this step: its slots wait
            continue
        del pending[param]
        if not slots or not _needs_start(optimizer, param):
            continue
        group = _group_of(optimizer, param)
        index = torch.tensor(sorted(slots), dtype=torch.long, device=param.device)
        d = param.grad.index_select(dim, index)
        d = -d if group["maximize"] else d
        if group["weight_decay"]:
            d = d + group["weight_decay"] * param.index_select(dim, index)
        buf = optimizer.state[param]["momentum_buffer"]
        buf.index_copy_(dim, index, (d * (group["dampening"] / group["momentum"])).to(buf.dtype))
