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
the optimizer holds, in one ``_foreach_zero_`` per step; slots already zero stay as they are.
"""

from __future__ import annotations

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from lorambo.nn.slots import local_slots, pool_slots
from lorambo.sharding import local_tensor

__all__ = ["zero_inactive_after_steps"]

_installed = False


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


@torch.no_grad()
def _after_step(optimizer, args, kwargs) -> None:
    groups = getattr(optimizer, "param_groups", None) or ()
    views = inactive_views(param for group in groups for param in group["params"])
    if views:
        torch._foreach_zero_(views)
