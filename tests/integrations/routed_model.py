"""A model with routed experts for the 2-process tests: a batch runs one expert only, so
processes given different batches run different subsets of the layers."""

import torch
from torch import nn

DT = torch.float64


class Routed(nn.Module):
    """A shared input layer, then expert 0 or expert 1, picked per batch (MoE-style routing)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 6, dtype=DT)
        self.e0 = nn.Linear(6, 3, dtype=DT)
        self.e1 = nn.Linear(6, 3, dtype=DT)

    def forward(self, x, expert):
        h = torch.tanh(self.inp(x))
        return self.e0(h) if expert == 0 else self.e1(h)
