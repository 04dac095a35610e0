"""Several models and optimizers in one process (a notebook's experiments one after another, a
teacher and a student): each optimizer hears of its own problem, about its own layer."""

import gc
import warnings

import pytest
import torch
from torch import nn

from lorambo import LoRAMBoLinear

DT = torch.float64


def _adam_run(name: str, seed: int):
    """A rank-2 layer and the torch Adam that has stepped it twice."""
    gen = torch.Generator().manual_seed(seed)
    layer = LoRAMBoLinear(nn.Linear(6, 5, dtype=DT), rank=2, capacity=4, name=name)
    opt = torch.optim.Adam([layer.lora_A, layer.lora_B], lr=1e-2)
    for _ in range(2):
        layer(torch.randn(4, 6, dtype=DT, generator=gen)).square().sum().backward()
        opt.step()
        opt.zero_grad()
    return layer, opt


def test_every_optimizer_is_warned_once_about_its_shared_step():
    first, first_opt = _adam_run("first.fc", 0)
    with pytest.warns(UserWarning, match=r"Adam keeps one step count per parameter: .* in LoRAMBoLinear 'first\.fc'"):
        first.set_rank(3, optimizer=first_opt)
    with warnings.catch_warnings():  # once per optimizer
        warnings.simplefilter("error")
        first.set_rank(4, optimizer=first_opt)
    del first, first_opt
    gc.collect()
    # the next experiment in the same process: a new model and optimizer grow too
    second, second_opt = _adam_run("second.fc", 1)
    with pytest.warns(UserWarning, match=r"Adam keeps one step count per parameter: .* in LoRAMBoLinear 'second\.fc'"):
        second.set_rank(3, optimizer=second_opt)
