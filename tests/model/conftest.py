import pytest


@pytest.fixture
def mlp():
    import torch.nn as nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = nn.Linear(8, 16)
            self.down = nn.Linear(16, 8)

        def forward(self, x):
            return self.down(self.up(x).relu())

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([Block(), Block()])
            self.norm = nn.LayerNorm(8)
            self.lm_head = nn.Linear(8, 5)

        def forward(self, x):
            for blk in self.blocks:
                x = x + blk(x)
            return self.lm_head(self.norm(x))

    return Net()
