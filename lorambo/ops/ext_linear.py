"""LoRA linear on the compiled extension (backend ``ext``): ``torch.ops.lorambo.lora_linear``.

Same math and gradients as :func:`lorambo.ops.lora_linear_reference` (y = x W^T + b +
s * (drop(x) A_r^T) B_r^T; inactive slots get exactly zero gradient; double backward for
Hessian-vector products), with two differences:

- the whole forward and backward run in C++ (csrc/cpu/lora_linear_cpu.cpp): no Python between
  the GEMMs, the rank-r part parallel over rows, no [M, N] temporary besides the output;
- dropout uses the extension's counter-based Philox mask (:func:`dropout_mask_ext`), regenerated
  in the backward, not torch's generator: for the same seed the dropped elements differ from
  the reference op's (each is a valid Bernoulli(1-p) mask).

On CUDA the op exists too (cuBLAS GEMMs + the same Philox mask), but the Triton backend is the
fast path there.
"""

from __future__ import annotations

import torch

from lorambo import _extension

__all__ = ["dropout_mask_ext", "lora_linear_ext"]


def lora_linear_ext(x, weight, bias, lora_A, lora_B, rank: int, scaling: float, dropout_p: float = 0.0,
                    seed: int | None = None):
    """LoRA linear on inputs [..., K]; weight [N, K], lora_A [cap, K], lora_B [N, cap].

    ``dropout_p > 0`` needs an integer ``seed`` in [0, 2^63).
    """
    _extension.require()
    if dropout_p > 0.0 and seed is None:
        raise ValueError("lora_linear_ext: dropout_p > 0 needs an integer seed")
    lead, k = x.shape[:-1], x.shape[-1]
    y = torch.ops.lorambo.lora_linear(x.reshape(-1, k), weight, bias, lora_A, lora_B, int(rank), float(scaling),
                                      float(dropout_p), int(seed) if seed is not None else 0)
    return y.reshape(*lead, weight.shape[0])


def dropout_mask_ext(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """The multiplier (0 or 1/(1-p)) that :func:`lora_linear_ext` applies to ``x`` (shape [..., K],
    element order row-major as in the flattened [M, K] input) for this ``(p, seed)``."""
    _extension.require()
    return torch.ops.lorambo.dropout_mask(x, float(p), int(seed))
