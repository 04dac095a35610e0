"""Whether the backward pass now running feeds a layer's ``.grad``, as its hooks see it.

A tensor hook on a layer's output fires in every pass that reaches it: ``loss.backward()``, but
also ``torch.autograd.grad(...)`` passes that leave ``.grad`` alone (a gradient penalty, an R1
regulariser, the input gradient of an adversarial example, a Hessian-vector product). Statistics
of the step's gradient (online growth's dY, the Fisher proxy) keep only the passes that
accumulate into the layer's parameters, as the optimizer's gradient does. The autograd engine
answers that per parameter: a parameter's accumulator node runs in ``backward()`` (and in
``backward(inputs=...)`` naming it), and not in ``torch.autograd.grad``, which captures the
gradients of its ``inputs`` instead of accumulating them.

The accumulator nodes are read off the output's graph in the forward hook: the parameters the
call used. A call that used no trainable parameter (a frozen layer, a merged LoRA layer) has no
``.grad`` to follow, and every pass through it counts.

Those parameters are read in a forward pre-hook (:class:`CallParameters`): a module that is
itself an FSDP2 unit (``fully_shard(layer)``) holds unsharded parameters only between FSDP's
pre-forward hook and its post-forward hook, which runs before any forward hook registered after
``fully_shard``; read there, ``module.parameters()`` are the sharded DTensors, which are not in
the graph, and every pass would count.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.hooks import RemovableHandle

from lorambo.nn.local_hooks import LocalHook

__all__ = ["CallParameters", "accumulator_nodes", "pass_feeds_grad"]

_DEPTH = 6  # a layer's parameters sit a few nodes below its output (views, casts, transposes)
_MAX_NODES = 64  # the walk stops at this many nodes: it must not wander the model's whole graph


class CallParameters:
    """The trainable parameters of each running call of the modules it hooks, as the call sees
    them: :meth:`register` hooks a module, and its forward hook reads them with :meth:`current`.

    A call's parameters are dropped by a forward hook that runs also when the forward, a
    pre-hook or an earlier forward hook raises (``always_call``): non-reentrant activation
    checkpointing stops each recomputation by raising inside the segment's last layer, which
    left one list per checkpointed segment per step behind while a capture stayed attached. A
    KeyboardInterrupt skips torch's always-called hooks; :meth:`clear` forgets what it leaves."""

    def __init__(self):
        self._calls: dict[int, list[list[torch.Tensor]]] = {}  # id(module) -> one list per running call

    def register(self, module: torch.nn.Module, forward_hook: Callable) -> list[RemovableHandle]:
        """Hook ``module``: the parameters are read before its forward, ``forward_hook(module,
        args, kwargs, output)`` runs after it, and the parameters are dropped last. Each hook is a
        :class:`LocalHook`: a copy of the model runs none of them. Returns the three handles."""
        return [module.register_forward_pre_hook(LocalHook(self._begin), with_kwargs=True),
                module.register_forward_hook(LocalHook(forward_hook), with_kwargs=True),
                module.register_forward_hook(LocalHook(self._end), with_kwargs=True, always_call=True)]

    def _begin(self, module: torch.nn.Module, args, kwargs) -> None:
        if not torch.compiler.is_compiling():  # accumulator_nodes looks at no graph while tracing
            self._calls.setdefault(id(module), []).append([p for p in module.parameters() if p.requires_grad])

    def _end(self, module: torch.nn.Module, args, kwargs, output) -> None:
        stack = self._calls.get(id(module))
        if stack and not torch.compiler.is_compiling():
            stack.pop()
            if not stack:
                del self._calls[id(module)]

    def current(self, module: torch.nn.Module) -> list[torch.Tensor] | None:
        """The parameters of ``module``'s call now ending; None while tracing."""
        stack = self._calls.get(id(module))
        return stack[-1] if stack and not torch.compiler.is_compiling() else None

    def clear(self) -> None:
        """Forget every call (on detaching: a call interrupted by Ctrl-C never ended)."""
        self._calls.clear()


def accumulator_nodes(module: torch.nn.Module, output: torch.Tensor,
                      trainable: list[torch.Tensor] | None = None) -> list | None:
    """Call from a forward hook: the accumulator nodes, in ``output``'s graph, of ``module``'s
    trainable parameters (``trainable``: those :meth:`CallParameters.current` gives; None: read now);
    None when the call used none of them (or they lie deeper than the walk looks, or the forward
    is being traced by torch.compile): then every pass counts."""
    if torch.compiler.is_compiling() or output.grad_fn is None:
        return None
    if trainable is None:
        trainable = [p for p in module.parameters() if p.requires_grad]
    if not trainable:
        return None
    found, seen, level = [], set(), [output.grad_fn]
    for _ in range(_DEPTH):
        below = []
        for node in level:
            for child, _ in node.next_functions:
                if child is None or id(child) in seen:
                    continue
                seen.add(id(child))
                variable = getattr(child, "variable", None)
                if variable is not None:
                    if any(variable is p for p in trainable):
                        found.append(child)
                else:
                    below.append(child)
        if len(found) == len(trainable) or len(seen) > _MAX_NODES:
            break
        level = below
    return found or None


def pass_feeds_grad(nodes: list | None) -> bool:
    """Call from a backward hook: whether the running pass accumulates into ``.grad`` of any
    parameter of ``nodes`` (from :func:`accumulator_nodes`; None: every pass counts)."""
    if nodes is None:
        return True
    for node in nodes:
        try:
            if torch._C._will_engine_execute_node(node):
                return True
        except RuntimeError:  # torch.autograd.grad(..., inputs=[p]): captured, not accumulated
            continue
    return False
