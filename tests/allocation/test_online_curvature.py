"""OnlineGrowth's ``curvature={name: h}`` turns each layer's gain, the loss decrease Delta of a new
rank, into the second-order estimate Delta^2 / (2 h) that the decision compares and records; an h
that is not finite and > 0 is refused."""

import pytest
import torch
from torch import nn

import lorambo
from lorambo.allocation.online import OnlineGrowth

DT = torch.float64


def _gains(**kwargs):
    torch.manual_seed(7)
    net = nn.Sequential(nn.Linear(6, 8, dtype=DT), nn.Tanh(), nn.Linear(8, 3, dtype=DT))
    layers = lorambo.lora_layers(lorambo.configure_model(net, {"0": 1, "2": 1}, capacity=3))
    grower = OnlineGrowth(layers, 10_000, sketch_rank=2, **kwargs)
    g = torch.Generator().manual_seed(8)
    x, y = torch.randn(12, 6, dtype=DT, generator=g), torch.randn(12, 3, dtype=DT, generator=g)
    with grower.capture:
        ((net(x) - y) ** 2).mean().backward()
    return {r["layer"]: r["gains"] for r in grower.update(step=0)}


def test_curvature_turns_each_gain_into_its_second_order_estimate():
    h = {"0": 0.25, "2": 3.0}
    plain, curved = _gains(), _gains(curvature=h)
    assert set(plain) == set(curved) == {"0", "2"}  # the budget and threshold 0 take every rank
    for name, gains in plain.items():
        want = [d * d / (2.0 * h[name]) for d in gains]
        assert curved[name] == pytest.approx(want, rel=1e-9), name


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_a_curvature_that_is_not_finite_and_positive_is_refused(bad):
    # Delta^2 / (2 h) would be inf, negative or nan: the decision would silently grow nothing
    with pytest.raises(ValueError, match=r"curvature of layer '2' is .*: must be finite and > 0"):
        _gains(curvature={"0": 0.5, "2": bad})
