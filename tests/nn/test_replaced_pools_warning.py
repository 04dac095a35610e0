"""``load_state_dict(sd, assign=True)`` puts the state_dict's tensors in the model as new pool
Parameters; an optimizer built before holds the old ones, so its steps silently trained no
adapter (the loss stayed where it was). Its next step now warns, naming assign=True."""

import warnings

import pytest
import torch
from torch import nn

import lorambo


def _trained(optimizer_class):
    torch.manual_seed(0)
    model = lorambo.configure_model(nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4)), 2)
    optimizer = optimizer_class([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randn(3, 6)
    model(x).square().sum().backward()
    optimizer.step()
    optimizer.zero_grad()
    return model, optimizer, x


@pytest.mark.parametrize("optimizer_class", [lorambo.optim.AdamW, torch.optim.AdamW], ids=["lorambo", "torch"])
def test_an_optimizer_of_the_pools_replaced_by_an_assign_load_warns(optimizer_class):
    model, optimizer, x = _trained(optimizer_class)
    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model(x).square().sum().backward()
    with pytest.warns(UserWarning, match=r"holds 4 LoRA pools .* that their layers no longer hold.*train no "
                                         r"adapter.*assign=True"):
        optimizer.step()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # what the warning is about

    # an optimizer built after the load trains the pools in place, without a warning
    fresh = optimizer_class([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fresh.step()
    assert not torch.equal(before["0.lora_A"], model[0].lora_A)


def test_a_pool_set_back_in_place_is_no_replaced_pool():
    """Every pool replaced and set back, or assigned to itself: the optimizer holds every pool in
    place again (with one pool still in place, no warning would come whatever the record says)."""
    model, optimizer, x = _trained(lorambo.optim.AdamW)
    layer = model[0]
    pool = layer.lora_A
    for each in (model[0], model[2]):
        for name in ("lora_A", "lora_B"):
            held = getattr(each, name)
            setattr(each, name, nn.Parameter(held.detach().clone()))
            setattr(each, name, held)  # back
    model[2].lora_B = model[2].lora_B  # itself: nothing replaced
    alone = torch.optim.SGD([model[2].lora_B], lr=1e-2)  # holds that pool only
    model(x).square().sum().backward()
    before = pool.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        optimizer.step()
        alone.step()
    assert not torch.equal(before, pool)
