"""Optimizers are tracked by identity: one that defines ``__eq__`` without ``__hash__`` (as a
dataclass does) trains pools and is warned about, and two that compare equal are two optimizers,
each warned about the state it leaves behind and each with its own inactive slots zeroed."""

import warnings

import pytest
import torch
from torch import nn

from lorambo import LoRAMBoLinear
from lorambo.nn.optimizer_tracking import StaleOptimizerStateWarning


class UnhashableAdam(torch.optim.Adam):
    def __eq__(self, other):
        return self is other

    __hash__ = None


class AllEqualAdam(torch.optim.Adam):
    """Every instance equal to every other, with one hash: equal, yet distinct optimizers."""

    def __eq__(self, other):
        return isinstance(other, AllEqualAdam)

    def __hash__(self):
        return 0


@pytest.mark.parametrize("cls", [UnhashableAdam, AllEqualAdam])
def test_each_optimizer_is_tracked_and_warned_about_on_its_own(cls):
    gen = torch.Generator().manual_seed(0)
    layers = [LoRAMBoLinear(nn.Linear(6, 5), rank=1, capacity=4) for _ in range(2)]
    opts = [cls([layer.lora_A, layer.lora_B], lr=0.1) for layer in layers]
    x = torch.randn(3, 6, generator=gen)
    for layer, opt in zip(layers, opts):
        with torch.no_grad():
            layer.lora_B.normal_(generator=gen)
        layer(x).sum().backward()
        opt.step()  # an unhashable optimizer raised TypeError in lorambo's step post-hook
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for layer in layers:
            layer.set_rank(3)  # without its optimizer, whose Adam moments stay at the old slots
    stale = [str(w.message) for w in caught if issubclass(w.category, StaleOptimizerStateWarning)]
    assert len(stale) == 2 and all(f"a {__name__}.{cls.__name__} holds state" in m for m in stale)
    for layer, opt in zip(layers, opts):
        layer.set_rank(1, optimizer=opt)
        with torch.no_grad():  # moves the inactive slots behind lorambo's back; the step's hook zeroes them
            layer.lora_A[1:].fill_(0.5)
            layer.lora_B[:, 1:].fill_(0.5)
        opt.zero_grad()
        layer(x).sum().backward()
        opt.step()
        assert torch.count_nonzero(layer.lora_A[1:]) == 0 and torch.count_nonzero(layer.lora_B[:, 1:]) == 0
        assert torch.count_nonzero(layer.lora_A[:1]) == 6
