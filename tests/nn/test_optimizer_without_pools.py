"""An optimizer built before configure_model trains no adapter: its first step warns."""

import warnings

import pytest
import torch
from torch import nn

import lorambo
from lorambo import configure_model


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4), nn.Linear(4, 2))


def _step(model, optimizer):
    x = torch.randn(5, 8)
    model(x).pow(2).mean().backward()
    optimizer.step()
    optimizer.zero_grad()


@pytest.mark.parametrize("make", [lambda ps: torch.optim.AdamW(ps, lr=1e-2),
                                  lambda ps: lorambo.optim.AdamW(ps, lr=1e-2)])
def test_optimizer_built_before_configure_model_warns(make):
    model = _model()
    optimizer = make(model.parameters())
    configure_model(model, 2, target_modules=["0", "2"], modules_to_save=["3"])  # "3" still trains
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora" in n}
    with pytest.warns(UserWarning, match=r"AdamW holds 4 of the base weights that lorambo froze.*none of the "
                                         r"LoRA pools.*built before configure_model"):
        _step(model, optimizer)
    # what the warning is about: the adapters did not move
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if "lora" in n)


def test_optimizer_built_after_configure_model_is_quiet():
    model = _model()
    configure_model(model, 2, target_modules=["0", "2"], modules_to_save=["3"])
    everything = torch.optim.SGD(model.parameters(), lr=1e-2)  # frozen ones included: harmless
    trainable = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    head = torch.optim.SGD(model[3].parameters(), lr=1e-2)  # trainable, no pool, no frozen base
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for optimizer in (everything, trainable, head):
            _step(model, optimizer)
