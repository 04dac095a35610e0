"""The operand shapes every LoRA op takes, checked before anything is computed.

    x [..., K], weight [N, K], bias [N] or None, lora_A [capacity, K], lora_B [N, capacity]

Without the check, broadcasting and slicing let some mismatches compute: a lora_B wider than
lora_A's capacity, or a [1, N] bias, gave an output and no error on the reference op.
"""

from __future__ import annotations

import torch

__all__ = ["check_shapes"]


def check_shapes(op: str, x, weight, bias, lora_A, lora_B) -> None:
    """Raise a ValueError naming ``op`` and the shapes unless they fit the op's contract.

    Skipped while ``torch.jit.trace`` records: sizes are traced values there and each comparison
    would warn (TracerWarning) in every trace of a model; a mismatch then fails in the op itself,
    with the product's or the extension's own error."""
    if torch.jit.is_tracing():
        return
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have at least one dimension [..., in_features]")
    if weight.dim() != 2 or lora_A.dim() != 2 or lora_B.dim() != 2:
        raise ValueError(f"{op}: weight, lora_A, lora_B must be 2-D, got shapes "
                         f"{tuple(weight.shape)}, {tuple(lora_A.shape)}, {tuple(lora_B.shape)}")
    n, k = weight.shape
    cap = lora_A.shape[0]
    if x.shape[-1] != k:
        raise ValueError(f"{op}: x has last dim {x.shape[-1]} (shape {tuple(x.shape)}), "
                         f"weight is {tuple(weight.shape)} = [out, in]")
    if lora_A.shape[1] != k:
        raise ValueError(f"{op}: lora_A is {tuple(lora_A.shape)}, expected [capacity, {k}]")
    if tuple(lora_B.shape) != (n, cap):
        raise ValueError(f"{op}: lora_B is {tuple(lora_B.shape)}, expected [{n}, {cap}] "
                         f"(out_features, capacity of lora_A)")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"{op}: bias is {tuple(bias.shape)}, expected [{n}]")
