"""Wrapping a base whose weight a parametrization computes does not compute it: a spectral_norm
weight read in training mode runs a power iteration (updating its u, v), so each read at wrap time
made the adapted layer's first outputs differ from those of the layer it replaced."""

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm, weight_norm

import lorambo
from lorambo.nn import LoRAMBoLinear

DT = torch.float64


def _slow_spectral_norm_base():
    # two close top singular values: the power iteration is still moving u, v after spectral_norm's
    # 15 start-up iterations, so every extra iteration shows in the output
    g = torch.Generator().manual_seed(3)
    u = torch.linalg.qr(torch.randn(48, 48, generator=g, dtype=DT)).Q
    v = torch.linalg.qr(torch.randn(64, 64, generator=g, dtype=DT)).Q
    s = torch.linspace(1.0, 0.1, 48, dtype=DT)
    s[1] = 0.999
    base = nn.Linear(64, 48, dtype=DT)
    with torch.no_grad():
        base.weight.copy_(u @ torch.diag(s) @ v[:48])
        base.bias.normal_(generator=g)
    torch.manual_seed(0)  # spectral_norm draws its u, v from the global generator
    return spectral_norm(base)


def _wrap_layer(base):
    return LoRAMBoLinear(base, rank=2)


def _wrap_model(base):
    return lorambo.configure_model(nn.Sequential(base), 2)


@pytest.mark.parametrize("wrap", [_wrap_layer, _wrap_model])
def test_first_train_forward_equals_the_unwrapped_layers(wrap):
    base = _slow_spectral_norm_base()
    unwrapped = copy.deepcopy(base).train()
    wrapped = wrap(base).train()
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(4), dtype=DT)
    want = unwrapped(x)
    got = wrapped(x)
    assert torch.equal(got, want), float((got - want).abs().max())
    sn = base.parametrizations.weight[0]
    ref = unwrapped.parametrizations.weight[0]
    assert torch.equal(sn._u, ref._u) and torch.equal(sn._v, ref._v)  # as many power iterations


@pytest.mark.parametrize("make", [lambda: spectral_norm(nn.Linear(6, 5, dtype=DT)),
                                  lambda: weight_norm(nn.Linear(6, 5, dtype=DT))])
def test_wrapping_computes_no_parametrized_weight(make, monkeypatch):
    base = make()
    chain = base.parametrizations.weight
    runs = []
    monkeypatch.setattr(type(chain), "forward", lambda self: runs.append(1) or torch.zeros(0))
    model = lorambo.configure_model(nn.Sequential(base), 2)
    monkeypatch.undo()
    assert runs == []
    pool = model[0].lora_A
    assert (pool.dtype, pool.device, pool.shape) == (DT, torch.device("cpu"), (model[0].capacity, 6))
