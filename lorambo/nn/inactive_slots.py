"""Keep inactive pool slots at zero after every optimizer step, whatever the optimizer.

A rank change zeroes the optimizer state of the slots it drops, but only the state it can see:
tensors in ``optimizer.state`` of the parameter's shape or with one entry per slot
(lorambo/nn/optimizer_state.py). An optimizer that keeps its momentum elsewhere (in an
attribute of its own, flattened, in a layout of its own) keeps moving a dropped slot with a
zero gradient (Lion: the sign of a non-zero momentum), and so does any optimizer left out of a
rank change's ``optimizer=``. Inactive slots never enter the forward, so that drift changes no
output, but it breaks the pool invariant (docs/architecture.md, the rank pool) that saving and
loading check: a checkpoint save hours into a run would refuse the model. So a process-wide
step post-hook (installed with the first LoRAMBoLinear) zeroes the inactive slots of every pool
the optimizer holds, in one call per step; slots already zero stay as they are. The call is the
extension's ``lorambo::zero_views_`` for CPU pools (one ``memset`` per row of a ``lora_B``
column block, where ``torch._foreach_zero_`` fills it element by element: 27-33 against 50 us
for 48 blocks [256, 8]) unless the backend switch is at ``torch``, else ``_foreach_zero_``.

The views are computed once per optimizer and reused until a pool's rank or Parameter object
(:func:`~lorambo.nn.slots.pools_generation`), the Parameter objects in the optimizer's groups
(compared by identity, so an entry swapped in a list is seen), or the memory of a pool change:
finding them costs microseconds per parameter, which every step of a host-bound run would pay.
The memory is compared by address (``param.data = new``, as
``torch.nn.utils.vector_to_parameters`` does, keeps the Parameter, its tag and its rank); a
sharded pool (a DTensor, FSDP2) or another tensor subclass without an address by its Parameter
object only.
"""

from __future__ import annotations

from operator import is_

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.weak import WeakIdKeyDictionary

from lorambo.ext import loader as ext_loader
from lorambo.nn.slots import local_slots, pool_slots, pools_generation
from lorambo.ops.backend import get_backend
from lorambo.ops.compile_support import run_eagerly
from lorambo.sharding import is_sharded, local_tensor

__all__ = ["zero_inactive_after_steps"]

_installed = False
# optimizer -> (key, its parameter lists copied, (views, zeroed in one compiled call),
#               the pools with an address, their addresses)
_cached = WeakIdKeyDictionary()  # by identity: an optimizer may be unhashable
_data_ptr = torch.Tensor.data_ptr


def zero_inactive_after_steps() -> None:
    """Install the step post-hook (once per process)."""
    global _installed
    if not _installed:
        register_optimizer_step_post_hook(_after_step)
        _installed = True


def inactive_views(params) -> list[torch.Tensor]:
    """The inactive slots this process holds of each pool among ``params``, as views."""
    views = []
    for param in params:
        tag = pool_slots(param)
        if tag is None:
            continue
        slots, dim = tag
        first, held = local_slots(param, dim)  # a DTensor's own shard (FSDP2)
        start = min(max(slots.rank - first, 0), held)
        if start < held:
            views.append(local_tensor(param).detach().narrow(dim, start, held - start))
    return views


def _has_address(param) -> bool:
    """Whether ``param``'s memory has an address to compare: not a DTensor (FSDP2) nor another
    tensor subclass without storage of its own."""
    if is_sharded(param):
        return False
    try:
        param.data_ptr()
    except RuntimeError:
        return False
    return True


def _views_of(optimizer) -> tuple[list[torch.Tensor], bool]:
    """The views to zero, and whether the extension's ``zero_views_`` takes them."""
    groups = getattr(optimizer, "param_groups", None) or ()
    key = (pools_generation(), get_backend())
    cached = _cached.get(optimizer)
    if (cached is not None and cached[0] == key and _same_params(groups, cached[1])
            and list(map(_data_ptr, cached[3])) == cached[4]):
        return cached[2]
    lists = [list(group["params"]) for group in groups]
    params = [param for held in lists for param in held]
    zeroing = _zeroing(inactive_views(params))
    plain = [param for param in params if pool_slots(param) is not None and _has_address(param)]
    _cached[optimizer] = (key, lists, zeroing, plain, list(map(_data_ptr, plain)))
    return zeroing


def _same_params(groups, lists: list[list]) -> bool:
    """Whether each group still holds the very Parameter objects of ``lists``, in order: catches
    add_param_group, and a list replaced, extended or with an entry swapped in place. Compared by
    identity in C (``map(is_)``), without building anything per step."""
    if len(groups) != len(lists):
        return False
    for group, held in zip(groups, lists):
        params = group["params"]
        if len(params) != len(held) or not all(map(is_, params, held)):
            return False
    return True


def _zeroing(views: list[torch.Tensor]) -> tuple[list[torch.Tensor], bool]:
    # its kernel is CPU only; the extension's absence is no error here, whatever the backend asked
    compiled = (bool(views) and get_backend() != "torch" and all(view.is_cpu for view in views)
                and ext_loader.load() is not None)
    return views, compiled


def _after_step(optimizer, args, kwargs) -> None:
    # an optimizer class that never writes inactive slots (lorambo.optim.AdamW) says so; tested
    # before entering no_grad, which alone costs more than this test at every step
    if getattr(optimizer, "_lorambo_keeps_inactive_slots", False):
        return
    _zero_inactive(optimizer)


@run_eagerly  # under a compiled step: traced, it would guard on every rank and recompile per change
@torch.no_grad()
def _zero_inactive(optimizer) -> None:
    views, compiled = _views_of(optimizer)
    if compiled:
        torch.ops.lorambo.zero_views_(views)
    elif views:
        torch._foreach_zero_(views)
