"""FisherProxy.state_dict() taken between two backward passes through one forward (a loss per
task, ``retain_graph=True``) leaves the measurement as it was. It folded the call still open
into the statistics, so the second pass started a new call: the examples counted twice and the
squares of each pass's gradient summed instead of the square of their sum (count 16 instead of
8). The state it returns holds the call as if it ended at the save."""

import pytest
import torch
from torch import nn

import lorambo
from lorambo.sensitivity.fisher import FisherProxy

pytestmark = pytest.mark.usefixtures("one_thread")


def _measure(save_between: bool, sketch_dim):
    torch.manual_seed(0)
    model = lorambo.configure_model(nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)), 2, capacity=3)
    with torch.no_grad():
        for layer in lorambo.lora_layers(model).values():
            layer.lora_B.normal_()
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 5, generator=gen), torch.randn(8, 3, generator=gen)
    proxy = FisherProxy(model, sketch_dim=sketch_dim)
    saved = None
    with proxy:
        out = model(x)
        ((out - y) ** 2).sum().backward(retain_graph=True)
        if save_between:
            saved = proxy.state_dict()
        out.abs().sum().backward()
    return proxy.state_dict(), saved


def _first_pass_only(sketch_dim):
    torch.manual_seed(0)
    model = lorambo.configure_model(nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)), 2, capacity=3)
    with torch.no_grad():
        for layer in lorambo.lora_layers(model).values():
            layer.lora_B.normal_()
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 5, generator=gen), torch.randn(8, 3, generator=gen)
    proxy = FisherProxy(model, sketch_dim=sketch_dim)
    with proxy:
        ((model(x) - y) ** 2).sum().backward()
    return proxy.state_dict()


def _same(got, want):
    assert got["count"] == want["count"]
    for table in ("sum", "sum_sq", "nonfinite"):
        assert set(got[table]) == set(want[table])
        for name in want[table]:
            torch.testing.assert_close(got[table][name], want[table][name], rtol=0, atol=0)
    assert set(got["generators"]) == set(want["generators"])
    for device, state in want["generators"].items():
        assert torch.equal(got["generators"][device], state)


@pytest.mark.parametrize("sketch_dim", [None, 4])
def test_a_save_between_two_passes_changes_nothing(sketch_dim):
    want, _ = _measure(save_between=False, sketch_dim=sketch_dim)
    got, saved = _measure(save_between=True, sketch_dim=sketch_dim)
    assert want["count"] == {"0": 8, "2": 8}  # one call of 8 examples per layer
    _same(got, want)
    _same(saved, _first_pass_only(sketch_dim))  # the call as if it had ended at the save
