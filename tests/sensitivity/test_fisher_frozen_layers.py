"""FisherProxy with the first layer's adapter frozen (its base is frozen too, and the input needs no
gradient): its output carries no gradient, so it is left out, with a warning that names this
cause (it said "the loss does not use them"); the other layers' estimates are those of the
model with nothing frozen, checked against per-example float64 gradients."""

import pytest
import torch

import lorambo
from lorambo.sensitivity import FisherProxy

from residual_net import ResidualNet, mse

DT = torch.float64


def test_a_frozen_first_layer_is_left_out_naming_the_cause_and_the_others_are_exact():
    torch.manual_seed(0)
    model = lorambo.configure_model(ResidualNet(width=8, hidden=12), 2, capacity=4)
    layers = lorambo.lora_layers(model)
    first = list(layers)[0]
    layers[first].requires_grad_(False)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 8, generator=gen, dtype=DT), torch.randn(6, 8, generator=gen, dtype=DT)
    with FisherProxy(model) as proxy:
        mse(model, (x, y)).backward()
    with pytest.warns(RuntimeWarning, match=rf"no gradient reached layer\(s\) \['{first}'\] .*first layers' "
                                            r"adapters are frozen"):
        got = proxy.estimates()
    assert set(got) == set(layers) - {first}
    # reference: Tr F = mean_n ||gradient of example n's loss (its mean over outputs) wrt W||^2
    weights = {n: m.base_layer.weight for n, m in layers.items() if n != first}
    for w in weights.values():
        w.requires_grad_(True)
    sq = {n: [] for n in weights}
    for i in range(6):
        grads = torch.autograd.grad(mse(model, (x[i:i + 1], y[i:i + 1])), list(weights.values()))
        for n, g in zip(weights, grads):
            sq[n].append(g.pow(2).sum())
    for n in weights:
        assert got[n].value == pytest.approx(float(torch.stack(sq[n]).mean()), rel=1e-9), n
