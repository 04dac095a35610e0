"""Route the LoRA linear op to the selected backend (see lorambo.backend)."""

from __future__ import annotations

import torch

from lorambo.backend import resolve_backend
from lorambo.ops.lora_linear_ref import lora_linear_reference


def new_dropout_seed() -> int:
    """A fresh dropout seed from torch's CPU generator: reproducible under torch.manual_seed
    and free of device synchronisation."""
    return int(torch.randint(0, 2**62, (), device="cpu"))


def lora_linear(x, weight, bias, lora_A, lora_B, rank: int, scaling: float, dropout_p: float = 0.0,
                seed: int | None = None):
    """``x W^T + b + s * (drop(x) A_r^T) B_r^T`` on the backend chosen for ``x.device``."""
    backend = resolve_backend(x.device.type, x.dtype)
    if backend == "triton":
        if dropout_p > 0.0 and seed is None:  # a graph value under torch.compile, not .item()
            seed = torch.randint(0, 2**62, (), device="cpu")
        from lorambo.ops.triton_linear import lora_linear_triton  # lazy: triton is optional

        return lora_linear_triton(x, weight, bias, lora_A, lora_B, rank, scaling, dropout_p, seed)
    if dropout_p > 0.0 and seed is None:
        seed = new_dropout_seed()
    if backend == "torch":
        return lora_linear_reference(x, weight, bias, lora_A, lora_B, rank, scaling, dropout_p, seed)
    if backend == "ext":
        from lorambo.ops.ext_linear import lora_linear_ext  # lazy: the extension is optional

        return lora_linear_ext(x, weight, bias, lora_A, lora_B, rank, scaling, dropout_p, seed)
    raise NotImplementedError(f"lorambo backend {backend!r} has no LoRA linear op")
