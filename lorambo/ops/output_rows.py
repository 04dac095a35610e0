"""The ``[..., out]`` output of a LoRA linear op from its ``[M, out]`` rows, as a fresh tensor.

``y.reshape(*lead, out)`` returns a view of the op's result, and autograd drops the hooks
registered on a view once it is modified in place (``h += residual``, ``ReLU(inplace=True)``):
online growth's capture and ``FisherProxy`` then never saw that layer's dY. ``aten._unsafe_view``
is the reshape torch's own ``linear`` / ``matmul`` return with: the same memory, not a view to
autograd. That is safe here because the rows are a temporary that nothing else holds (the ops'
backward saves the inputs and the low-rank intermediate, never the output).
"""

from __future__ import annotations

import torch

__all__ = ["rows_to_output"]


def rows_to_output(y: torch.Tensor, lead) -> torch.Tensor:
    """``y`` [M, out] as [*lead, out] (M = prod(lead)), not a view of ``y`` to autograd: ``y``
    itself when it is that shape and no view."""
    if torch.jit.is_tracing():  # view() records the sizes as traced values: the trace serves other shapes
        return y.view(*lead, y.shape[-1])
    if len(lead) == 1 and not torch.compiler.is_compiling() and not y._is_view():
        return y  # a 2-D input: the rows are the output already (the aten call costs 3 us per layer call)
    return torch.ops.aten._unsafe_view(y, (*lead, y.shape[-1]))
