"""restore_missed_adapter (Trainer resume): which layers and modules_to_save differ from the
checkpoint's adapter file, what is loaded, and what is refused before anything changes."""

import pytest
import torch
from torch import nn

import lorambo
from lorambo.integrations.pool_resume import restore_missed_adapter


def build(modules_to_save=("2",), with_head=True):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), *([nn.Linear(6, 3)] if with_head else []))
    return lorambo.configure_model(net, {"0": 2}, capacity={"0": 3}, modules_to_save=list(modules_to_save))


def test_a_module_to_save_the_model_lacks_is_load_adapters_value_error_and_nothing_changes(tmp_path):
    """The checkpoint saved a head the resumed model does not have: refused naming the file and
    the module, as load_adapter refuses it, not an AttributeError from deep in the comparison."""
    lorambo.save_adapter(build(), tmp_path)
    headless = build(modules_to_save=(), with_head=False)
    with torch.no_grad():
        headless[0].lora_B.normal_()  # differs from the file too
    before = {k: v.clone() for k, v in headless.state_dict().items()}
    with pytest.raises(ValueError, match=r"adapter.safetensors: module to save '2' is not in Sequential"):
        restore_missed_adapter(headless, tmp_path)
    for key, value in headless.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_a_lora_layer_the_model_lacks_is_load_adapters_value_error(tmp_path):
    """The checkpoint adapted layer '2', the resumed model adapts '0' only."""
    torch.manual_seed(0)
    net = lorambo.configure_model(nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5)), 2, capacity=3)
    lorambo.save_adapter(net, tmp_path)
    fewer = build(modules_to_save=())
    before = {k: v.clone() for k, v in fewer.state_dict().items()}
    with pytest.raises(ValueError, match=r"adapter.safetensors"):
        restore_missed_adapter(fewer, tmp_path)
    for key, value in fewer.state_dict().items():
        assert torch.equal(value, before[key]), key
