"""FisherProxy(reduction="token_mean") keeps the latest call's token mask only while attached."""

import gc

import torch
from torch import nn

from lorambo.sensitivity import FisherProxy


class _Tracked(torch.Tensor):
    """Results of ops on a _Tracked tensor are _Tracked: every tensor derived from the mask is."""


class _Masked(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 3)

    def forward(self, x, attention_mask):
        return self.proj(x)


def _live_per_example_tensors() -> int:
    """Live _Tracked tensors with a batch dim: the mask and its per-example scales (the 0-d
    sums the proxy gathered are derived from them too, and are meant to stay)."""
    gc.collect()
    return sum(type(o) is _Tracked and o.dim() > 0 for o in gc.get_objects())


def test_detach_drops_the_last_batch_mask():
    torch.manual_seed(0)
    model = _Masked()
    x = torch.randn(2, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]).as_subclass(_Tracked)
    proxy = FisherProxy(model, reduction="token_mean")
    with proxy:
        model(x, attention_mask=mask).square().sum().backward()
    del mask
    assert _live_per_example_tensors() == 0, "FisherProxy still holds the last batch's token mask after detach()"
    assert proxy.estimates()["proj"].value > 0  # what was gathered stays
