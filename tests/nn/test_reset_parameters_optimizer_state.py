"""reset_parameters() puts new components in every active slot. An optimizer that has stepped the
pools keeps Adam moments of the old ones, and its next step moves the new components by them (B
leaves zero although its gradient is zero): the output changes, so reset_parameters warns."""

import warnings

import pytest
import torch
from torch import nn

import lorambo
from lorambo.nn import StaleOptimizerStateWarning


def _layer():
    torch.manual_seed(0)
    return lorambo.LoRAMBoLinear(nn.Linear(6, 5).double(), rank=2, capacity=4)


def test_reset_after_an_optimizer_stepped_the_pools_warns_and_the_stale_moments_do_move_b():
    layer = _layer()
    opt = torch.optim.Adam(layer.parameters(), lr=0.1)
    layer(torch.randn(8, 6, dtype=torch.float64)).square().sum().backward()
    opt.step()
    with pytest.warns(StaleOptimizerStateWarning, match=r"reset_parameters\(\) re-initialised its slots without its "
                                                         r"optimizer.*Build a new optimizer for the new components"):
        layer.reset_parameters()
    assert bool((layer.lora_B == 0).all())
    layer.lora_A.grad = torch.zeros_like(layer.lora_A)  # no gradient at all: only the old moments act
    layer.lora_B.grad = torch.zeros_like(layer.lora_B)
    opt.step()
    assert float(layer.lora_B.detach()[:, :2].abs().max()) > 1e-3  # what the warning is about


def test_reset_before_any_step_is_quiet():
    layer = _layer()
    torch.optim.Adam(layer.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", StaleOptimizerStateWarning)
        layer.reset_parameters()


@pytest.mark.parametrize("rank", [2, 3])
def test_loading_an_adapter_after_an_optimizer_stepped_the_pools_warns_with_the_remedy_of_a_load(rank, tmp_path):
    """load_adapter takes no optimizer: the warning must not tell the user to pass one."""
    model = lorambo.configure_model(nn.Sequential(nn.Linear(6, 5).double()), 2, capacity=4)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(8, 6, dtype=torch.float64)).square().sum().backward()
    opt.step()
    other = lorambo.configure_model(nn.Sequential(nn.Linear(6, 5).double()), rank, capacity=4)
    path = lorambo.save_adapter(other, tmp_path / "adapter.safetensors")
    with pytest.warns(StaleOptimizerStateWarning) as caught:
        lorambo.load_adapter(model, path)
    (message,) = [str(w.message) for w in caught if w.category is StaleOptimizerStateWarning]
    assert "an adapter loaded into it replaced its components without its optimizer" in message
    assert "Build a new optimizer for the new components" in message and "Pass optimizer=" not in message
