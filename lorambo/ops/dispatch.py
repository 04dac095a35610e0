"""Route the LoRA linear op to the selected backend (see lorambo.ops.backend).

Everything here is traceable by torch.compile with fullgraph=True: the backend comes from the
resolution cache (a constant of the graph), the dropout seed is drawn as a 0-d CPU tensor (a
graph value, so every call of a compiled model gets a fresh mask), and each backend's op is a
custom op with a fake implementation.
"""

from __future__ import annotations

import torch

from lorambo.ops.backend import resolve_backend
from lorambo.ops import ext_linear, triton_linear
from lorambo.ops.functorch_path import needs_composite, lora_linear_composite
from lorambo.ops.lora_linear_ref import lora_linear_reference
from lorambo.ops.op_operands import check_operands, check_scalars


def new_dropout_seed() -> torch.Tensor:
    """A fresh dropout seed (0-d int64 CPU tensor) from torch's CPU generator: reproducible under
    torch.manual_seed, free of device synchronisation, and a graph value under torch.compile."""
    return torch.randint(0, 2**62, (), device="cpu")


def lora_linear(x, weight, bias, lora_A, lora_B, rank: int, scaling: float, dropout_p: float = 0.0,
                seed=None):
    """``x W^T + b + s * (drop(x) A_r^T) B_r^T`` on the backend chosen for ``x.device``.

    ``rank`` may be a symbolic int under torch.compile; ``seed`` an int, a 0-d int64 CPU tensor,
    or None (a fresh seed per call when ``dropout_p > 0``). Inside a ``torch.func`` transform the
    op is plain torch ops and its dropout is ``F.dropout``, and so under forward-mode AD (see
    :mod:`lorambo.ops.functorch_path`).
    """
    if needs_composite():  # the backends' autograd Functions compose with neither torch.func nor forward AD
        # the backends' checks, which this path skips: its slices would take rank -1 as "all but
        # the last slot" and clip a rank past the capacity
        check_operands("lora_linear", x, weight, bias, lora_A, lora_B)
        check_scalars("lora_linear", rank, lora_A.shape[0], scaling, dropout_p)
        return lora_linear_composite(x, weight, bias, lora_A, lora_B, rank, scaling, dropout_p)
    if dropout_p > 0.0 and seed is None:
        seed = new_dropout_seed()
    backend = resolve_backend(x.device.type, x.dtype)
    if backend == "torch":
        return lora_linear_reference(x, weight, bias, lora_A, lora_B, rank, scaling, dropout_p, seed)
    if backend == "ext":
        return ext_linear._lora_linear(x, weight, bias, lora_A, lora_B, rank, scaling, dropout_p, seed)
    if backend == "triton":
        return triton_linear.lora_linear_triton(x, weight, bias, lora_A, lora_B, rank, scaling, dropout_p, seed,
                                                device_checked=True)
    raise NotImplementedError(f"lorambo backend {backend!r} has no LoRA linear op")
