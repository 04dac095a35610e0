"""Comparison layers shared by the benchmark scripts (imported from benchmarks/ as a plain module)."""

from __future__ import annotations

import torch
from torch import nn


class PeftStyleLoRA(nn.Module):
    """What peft's LoRA Linear computes in eager mode: ``base(x) + s * B(A(dropout(x)))``.

    ``lora_a`` [r, in] and ``lora_b`` [out, r] give the adapter's values; without them A keeps
    nn.Linear's initialisation and B is drawn with std 0.01 (not peft's zeros: a product with an
    all-zero operand can run faster than one with real data, which would flatter the comparison).
    """

    def __init__(self, base: nn.Linear, rank: int, scaling: float = 2.0,
                 lora_a: torch.Tensor | None = None, lora_b: torch.Tensor | None = None):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, device=base.weight.device)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, device=base.weight.device)
        with torch.no_grad():
            if lora_a is not None:
                self.lora_A.weight.copy_(lora_a)
            if lora_b is not None:
                self.lora_B.weight.copy_(lora_b)
            else:
                self.lora_B.weight.normal_(std=0.01)
        self.dropout = nn.Identity()
        self.scaling = scaling

    def forward(self, x):
        return self.base(x) + self.lora_B(self.lora_A(self.dropout(x))) * self.scaling
