"""Gradients belong to their slots: rank changes between backward() and step() move them."""

import pytest
import torch
from torch import nn

import lorambo


def _layer_with_grads(rank=4, capacity=6):
    layer = lorambo.LoRAMBoLinear(nn.Linear(9, 8, dtype=torch.float64), rank=rank, capacity=capacity)
    with torch.no_grad():
        layer.lora_B[:, :rank].normal_()
    layer(torch.randn(5, 9, dtype=torch.float64)).square().sum().backward()
    assert layer.lora_A.grad[:rank].abs().min(dim=1).values.gt(0).all()
    return layer


def test_keep_components_moves_each_gradient_with_its_component():
    layer = _layer_with_grads()
    grad_a, grad_b = layer.lora_A.grad.clone(), layer.lora_B.grad.clone()
    layer.keep_components([2, 0])
    assert torch.equal(layer.lora_A.grad[:2], grad_a[[2, 0]])
    assert torch.equal(layer.lora_B.grad[:, :2], grad_b[:, [2, 0]])
    assert not layer.lora_A.grad[2:].any() and not layer.lora_B.grad[:, 2:].any()


@pytest.mark.parametrize("optimizer_class", [torch.optim.AdamW, lorambo.optim.AdamW])
def test_inactive_slots_stay_exactly_zero_through_the_next_step(optimizer_class):
    layer = _layer_with_grads()
    opt = optimizer_class(layer.parameters(), lr=1e-1)
    layer.keep_components([0, 2], optimizer=opt)
    opt.step()
    assert not layer.lora_A[2:].any() and not layer.lora_B[:, 2:].any()


def test_shrink_and_grow_give_changed_slots_zero_gradient():
    layer = _layer_with_grads()
    grad_a = layer.lora_A.grad.clone()
    layer.set_rank(2)
    assert torch.equal(layer.lora_A.grad[:2], grad_a[:2]) and not layer.lora_A.grad[2:].any()
    layer.lora_A.grad[2:].fill_(1.0)  # a stale value must not reach a newly active slot
    layer.lora_B.grad[:, 2:].fill_(1.0)
    layer.set_rank(5)
    assert not layer.lora_A.grad[2:5].any() and not layer.lora_B.grad[:, 2:5].any()


def test_a_load_that_lowers_the_rank_drops_the_gradients_of_the_dropped_slots():
    """A state_dict of rank 2 loaded between backward() and the step (gradients kept by
    accumulation or zero_grad(set_to_none=False)) left slots 2..3 their gradients: clipping
    counted them and a torch optimizer's moments took them in."""
    torch.manual_seed(0)
    saved = _layer_with_grads(rank=2).state_dict()
    layer = _layer_with_grads(rank=4)
    grad_a, grad_b = layer.lora_A.grad.clone(), layer.lora_B.grad.clone()
    layer.load_state_dict(saved)
    assert layer.rank == 2
    assert torch.equal(layer.lora_A.grad[:2], grad_a[:2]) and torch.equal(layer.lora_B.grad[:, :2], grad_b[:, :2])
    assert not layer.lora_A.grad[2:].any() and not layer.lora_B.grad[:, 2:].any()
    # the norm clipping sees is that of the active slots' gradients alone
    active = torch.cat([grad_a[:2].flatten(), grad_b[:, :2].flatten()])
    norm = torch.nn.utils.clip_grad_norm_([layer.lora_A, layer.lora_B], 1e-3)
    torch.testing.assert_close(norm, active.norm(), rtol=1e-12, atol=0)
