"""The small residual MLP that the optimizer and allocation tests train, and its loss.

Blocks of ``up`` / ``down`` Linears with a tanh between them, each block added to its input, then
an optional head: the Linear layers a LoRA targets by default, plus one it leaves out.
"""

import torch
from torch import nn


class ResidualNet(nn.Module):
    """``blocks`` residual blocks ``x + down(tanh(up(x)))`` of ``width`` -> ``hidden`` -> ``width``,
    then, if ``head`` = (attribute name, outputs), a Linear head under that name."""

    def __init__(self, width: int = 8, hidden: int = 16, blocks: int = 2, head: tuple[str, int] | None = None,
                 dtype: torch.dtype = torch.float64):
        super().__init__()
        self.blocks = nn.ModuleList(nn.ModuleDict({"up": nn.Linear(width, hidden, dtype=dtype),
                                                   "down": nn.Linear(hidden, width, dtype=dtype)})
                                    for _ in range(blocks))
        self.head_name = None if head is None else head[0]
        if head is not None:
            setattr(self, head[0], nn.Linear(width, head[1], dtype=dtype))

    def forward(self, x):
        for blk in self.blocks:
            x = x + blk["down"](torch.tanh(blk["up"](x)))
        return x if self.head_name is None else getattr(self, self.head_name)(x)


def mse(model, batch):
    """loss_fn(model, (x, y)): the mean squared error of model(x) against y."""
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def head_batches(n: int = 2, seed: int = 0, outputs: int = 3) -> list:
    """``n`` seeded float64 batches (x [12, 8], y [12, outputs]) for a ResidualNet with an
    ``outputs``-wide head."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(12, 8, dtype=torch.float64, generator=g),
             torch.randn(12, outputs, dtype=torch.float64, generator=g)) for _ in range(n)]
