"""OnlineGrowth refuses each setting it cannot use as given, naming it, when it is built (not at
the first decision, maybe hours in), and accepts the smallest value of each that it can use."""

import math

import pytest
import torch
from torch import nn

import lorambo
from lorambo.allocation.online import OnlineGrowth

DT = torch.float64


def _layers():
    torch.manual_seed(5)
    net = nn.Sequential(nn.Linear(6, 8, dtype=DT), nn.Tanh(), nn.Linear(8, 3, dtype=DT))
    return net, lorambo.lora_layers(lorambo.configure_model(net, {"0": 1, "2": 1}, capacity=3))


@pytest.mark.parametrize("setting, match", [
    # a negative oversample would estimate fewer directions than sketch_rank asks for
    ({"oversample": -1}, r"oversample=-1 must be an int >= 0"),
    ({"power_iters": -1}, r"power_iters=-1 must be an int >= 0"),
    ({"sketch_rank": 0}, r"sketch_rank=0 must be an int >= 1"),
    ({"max_moves": 0}, r"max_moves=0 must be an int >= 1"),
    ({"max_tokens": 0}, r"max_tokens=0 must be an int >= 1"),
    # None is no threshold: float(None) would fail with a TypeError naming nothing
    ({"threshold": None}, r"loss_improvement_threshold=None must be a real number \(not NaN\)$"),
    ({"threshold": math.nan}, r"loss_improvement_threshold=nan must be a real number"),
    ({"move_threshold": math.nan}, r"move_threshold=nan must be a real number \(not NaN\) or None")])
def test_a_setting_it_cannot_use_is_refused_by_name(setting, match):
    _, layers = _layers()
    with pytest.raises(ValueError, match=match):
        OnlineGrowth(layers, 10_000, **setting)


def test_the_smallest_usable_settings_are_accepted_and_decide():
    # one direction, no power iteration, no oversampling, one captured row per call
    net, layers = _layers()
    grower = OnlineGrowth(layers, 10_000, sketch_rank=1, power_iters=0, oversample=0, max_tokens=1,
                          move_threshold=None, max_moves=1)
    g = torch.Generator().manual_seed(6)
    x, y = torch.randn(8, 6, dtype=DT, generator=g), torch.randn(8, 3, dtype=DT, generator=g)
    with grower.capture:
        ((net(x) - y) ** 2).mean().backward()
    records = grower.update(step=0)
    # threshold 0 and room everywhere: each layer gains its one estimated rank
    assert sorted((r["layer"], r["old_rank"], r["new_rank"]) for r in records) == [("0", 1, 2), ("2", 1, 2)]


def test_a_zero_budget_is_accepted_and_a_negative_one_refused():
    # 0 parameters is a budget (nothing may grow; moves may still trade ranks), -1 is not
    _, layers = _layers()
    assert OnlineGrowth(layers, 0).budget == 0
    with pytest.raises(ValueError, match=r"budget=-1 must be a finite number of parameters >= 0"):
        OnlineGrowth(layers, -1)
