"""configure_model interrupted midway (Ctrl-C, out of memory) leaves the model as it was."""

import pytest
import torch
from torch import nn

from lorambo import configure_model
from lorambo.nn import lora_linear
from lorambo.nn.frozen_bases import _FROZEN


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4))


def _snapshot(model):
    return ({n: type(m) for n, m in model.named_modules()},
            {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()})


def _assert_same(model, snap):
    types, params = snap
    assert {n: type(m) for n, m in model.named_modules()} == types
    now = dict(model.named_parameters())
    assert set(now) == set(params)
    for n, (value, flag) in params.items():
        assert torch.equal(now[n].detach(), value), n
        assert now[n].requires_grad == flag, n
    # nor are its weights on record as frozen adapter bases (an optimizer of them would be warned about)
    assert not any(p in _FROZEN for p in model.parameters())


@pytest.mark.parametrize("frozen_first", [False, True])
@pytest.mark.parametrize("fault", [KeyboardInterrupt, MemoryError])
@pytest.mark.parametrize("k", [1, 2, 3])  # building the first, middle, last layer
def test_a_fault_while_building_layer_k_leaves_the_model_as_it_was(monkeypatch, fault, k, frozen_first):
    """Ctrl-C while building the second layer left the first one's base weight frozen (only
    Exception was cleaned up), so the plain model no longer trained its first Linear. In a model
    frozen beforehand (the usual start), the weights of the layer being built stayed on record as
    an adapter's frozen base."""
    model = _model()
    if frozen_first:
        model.requires_grad_(False)
    x = torch.randn(3, 6)
    expected = model(x)
    snap = _snapshot(model)
    built, init = [], lora_linear.LoRAMBoLinear.__init__

    def failing_init(self, *args, **kwargs):
        built.append(1)
        if len(built) == k:
            init(self, *args, **kwargs)  # the base is frozen by now: fail after that
            raise fault
        init(self, *args, **kwargs)

    monkeypatch.setattr(lora_linear.LoRAMBoLinear, "__init__", failing_init)
    with pytest.raises(fault):
        configure_model(model, 2)
    assert len(built) == k
    _assert_same(model, snap)
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)

