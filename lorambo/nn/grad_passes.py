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

import torch

__all__ = ["CallParameters", "accumulator_nodes", "pass_feeds_grad"]

_DEPTH = 6  # a layer's parameters sit a few nodes below its output (views, casts, transposes)
_MAX_NODES = 64  # the walk stops at this many nodes: it must not wander the model's whole graph


class CallParameters:
    """The trainable parameters of each running call of the modules it is registered on, as the
    call sees them: register :meth:`pre_hook` as a forward pre-hook (``with_kwargs=True``) and
    call :meth:`pop` first thing in the forward hook."""

    def __init__(self):
        self._calls: dict[int, list[list[torch.Tensor]]] = {}  # id(module) -> one list per running call

    def pre_hook(self, module: torch.nn.Module, args, kwargs) -> None:
        if not torch.compiler.is_compiling():  # accumulator_nodes looks at no graph while tracing
            self._calls.setdefault(id(module), []).append([p for p in module.parameters() if p.requires_grad])

    def pop(self, module: torch.nn.Module) -> list[torch.Tensor] | None:
        """The parameters of ``module``'s call now ending; None while tracing."""
        stack = self._calls.get(id(module))
        return stack.pop() if stack and not torch.compiler.is_compiling() else None

    def clear(self) -> None:
        """Forget calls whose forward raised (their forward hook never popped them)."""
        self._calls.clear()


def accumulator_nodes(module: torch.nn.Module, output: torch.Tensor,
                      trainable: list[torch.Tensor] | None = None) -> list | None:
    """Call from a forward hook: the accumulator nodes, in ``output``'s graph, of ``module``'s
    trainable parameters (``trainable``: those :meth:`CallParameters.pop` gives; None: read now);
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
