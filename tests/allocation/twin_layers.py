"""Two layers of one shape fed the same input, with equal weights: every sensitivity and curve
of one equals the other's, so a rounding-level change of one flips which layer gets the odd
rank of a budget of 3 ranks (ties go to the earlier layer)."""

import torch
from torch import nn

DT = torch.float64
BUDGET = 3 * 12  # 3 ranks of d + k = 12
NUDGE = 1 + 2.0**-45  # a rounding-level relative change


class Twin(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 6, dtype=DT), nn.Linear(6, 6, dtype=DT)
        with torch.no_grad():
            self.b.weight.copy_(self.a.weight)
            self.b.bias.copy_(self.a.bias)

    def forward(self, x):
        return self.a(x) + self.b(x)


def twin(nudged: bool = False) -> Twin:
    """The seeded twin model; ``nudged``: ``b``'s weight scaled by ``NUDGE``."""
    torch.manual_seed(0)
    net = Twin()
    if nudged:
        with torch.no_grad():
            net.b.weight.mul_(NUDGE)
    return net


def batches():
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(5, 6, generator=g, dtype=DT), torch.randn(5, 6, generator=g, dtype=DT)) for _ in range(2)]


def loss_fn(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).mean()
