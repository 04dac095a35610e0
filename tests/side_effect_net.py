"""A small float64 model with every kind of state an analysis pass could disturb: BatchNorm
running statistics, a Dropout, a buffer that its forward mutates in train mode, and a mixed-mode
model (one submodule in eval), plus its batches and loss."""

import torch
from torch import nn

DT = torch.float64


class Counter(nn.Module):
    """Adds nothing; counts its forwards in train mode (a buffer mutated by forward)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))

    def forward(self, x):
        if self.training:
            self.calls += 1
        return x


def model_and_batches():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6, dtype=DT), nn.BatchNorm1d(6, dtype=DT), nn.Dropout(0.5),
                          Counter(), nn.Linear(6, 3, dtype=DT))
    model.train()
    model[2].eval()  # a mixed-mode model: each flag must come back as it was
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 4, generator=g, dtype=DT), torch.randn(8, 3, generator=g, dtype=DT))
               for _ in range(3)]
    return model, batches


def mse(model, batch):
    x, y = batch
    return (model(x) - y).pow(2).mean()
