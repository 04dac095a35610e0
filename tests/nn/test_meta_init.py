"""Meta-device construction (large models, FSDP): after ``to_empty`` the pools hold whatever the
memory held; the usual ``reset_parameters()`` pass over every module must make each LoRAMBoLinear
a valid new adapter again: Kaiming rows of A, zero B, zero inactive slots."""

import math

import pytest
import torch
from torch import nn

import lorambo


def _meta_model():
    with torch.device("meta"):
        net = nn.Sequential(nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 8))
    lorambo.configure_model(net, {"0": 2, "2": 3}, capacity=4)
    return net


def test_reset_parameters_after_to_empty_gives_a_valid_new_adapter():
    net = _meta_model()
    net.to_empty(device="cpu")
    with torch.no_grad():  # what uninitialised memory may hold, made explicit
        for layer in lorambo.lora_layers(net).values():
            layer.lora_A.fill_(1e30)
            layer.lora_B.fill_(-7.0)
    for module in net.modules():  # the standard initialisation pass (FSDP's param_init_fn does this)
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    x = torch.randn(5, 16)
    plain = nn.Sequential(net[0].base_layer, nn.Tanh(), net[2].base_layer)
    torch.testing.assert_close(net(x), plain(x), rtol=0, atol=0)  # B = 0: the base model's function
    for layer in lorambo.lora_layers(net).values():
        r, bound = layer.rank, 1 / math.sqrt(layer.in_features)  # kaiming_uniform_(a=sqrt(5))
        assert not layer.lora_B.any() and not layer.lora_A[r:].any()
        assert layer.lora_A[:r].abs().max() <= bound and layer.lora_A[:r].abs().min() > 0
    opt = lorambo.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        net(torch.randn(5, 16)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    for layer in lorambo.lora_layers(net).values():
        assert layer.lora_B[:, :layer.rank].any() and not layer.lora_A[layer.rank:].any()


def test_reset_parameters_takes_a_generator_and_refuses_a_merged_layer():
    layer = lorambo.LoRAMBoLinear(nn.Linear(10, 6), rank=2, capacity=4)
    layer.reset_parameters(generator=torch.Generator().manual_seed(3))
    first = layer.lora_A.detach().clone()
    layer.reset_parameters(generator=torch.Generator().manual_seed(3))
    assert torch.equal(layer.lora_A, first) and layer.rank == 2
    layer.merge()
    with pytest.raises(RuntimeError, match="unmerge"):
        layer.reset_parameters()


@pytest.mark.parametrize("train", [False, True])
def test_forward_and_backward_on_meta_give_the_shapes_of_the_base_model(backend, train):
    """Meta tensors (shape inference, memory estimates before to_empty) go through a model of
    LoRAMBoLinear layers as through its plain Linears. The forward used to ask for the meta
    device's autocast state (which torch refuses) and dropout for a meta generator."""
    with torch.device("meta"):
        net = nn.Sequential(nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 8))
        plain = nn.Sequential(nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 8))
    lorambo.configure_model(net, {"0": 2, "2": 3}, capacity=4, dropout=0.1)
    net.train(train)
    x = torch.randn(2, 5, 16, device="meta", requires_grad=True)
    y = net(x)
    assert y.device.type == "meta" and y.shape == plain(x).shape
    y.sum().backward()
    assert x.grad.shape == x.shape
    for layer in lorambo.lora_layers(net).values():
        assert layer.lora_A.grad.shape == layer.lora_A.shape and layer.lora_B.grad.shape == layer.lora_B.shape
