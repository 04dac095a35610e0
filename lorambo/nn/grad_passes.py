"""Whether the backward pass now running feeds a layer's ``.grad``, as its hooks see it.

A tensor hook on a layer's output fires in every pass that reaches it: ``loss.backward()``, but
also ``torch.autograd.grad(...)`` passes that leave ``.grad`` alone (a gradient penalty, an R1
regulariser, the input gradient of an adversarial example, a Hessian-vector product). Statistics
of the step's gradient (online growth's dY, the Fisher proxy) keep only the passes that
accumulate into the layer's parameters, as the optimizer's gradient does. The autograd engine
answers that per parameter: a parameter's accumulator node runs in ``backward()`` (and in
``backward(inputs=...)`` naming it), and not in ``torch.autograd.grad``, which captures the
gradients of its ``inputs`` instead of accumulating them.
"""

from __future__ import annotations

import torch
from torch.autograd.graph import get_gradient_edge

__all__ = ["pass_feeds_grad"]


def pass_feeds_grad(module: torch.nn.Module) -> bool:
    """Call from a backward hook: whether the running pass accumulates into ``.grad`` of any of
    ``module``'s trainable parameters. A module without trainable parameters (a frozen plain
    layer) has no ``.grad`` to follow: every pass counts."""
    trainable = [p for p in module.parameters() if p.requires_grad]
    if not trainable:
        return True
    for p in trainable:
        try:
            if torch._C._will_engine_execute_node(get_gradient_edge(p).node):
                return True
        except RuntimeError:  # torch.autograd.grad(..., inputs=[p]): captured, not accumulated
            continue
    return False
