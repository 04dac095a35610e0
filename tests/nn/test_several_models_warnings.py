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


def test_an_optimizer_over_an_unloaded_model_is_not_told_it_trains_no_adapter():
    """After a LoRA run the model is unloaded and a head-only run trains its classifier with an
    optimizer over all its parameters, the frozen ones included (they get no gradient): nothing
    there is an adapter's frozen base, and the head trains as under plain torch."""
    from lorambo import configure_model, unload

    torch.manual_seed(0)
    for merge in (True, False):
        model = nn.Sequential(nn.Linear(8, 16, dtype=DT), nn.Tanh(), nn.Linear(16, 3, dtype=DT))
        configure_model(model, 2, target_modules=["0", "2"])
        unload(model, merge=merge)
        model.requires_grad_(False)
        model[2].requires_grad_(True)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        x = torch.randn(5, 8, dtype=DT)
        model(x).square().sum().backward()
        expected = model[2].weight.detach() - 0.1 * model[2].weight.grad
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            opt.step()
        torch.testing.assert_close(model[2].weight.detach(), expected, rtol=0, atol=1e-12)


def test_a_failed_configure_leaves_no_frozen_base_behind():
    """configure_model refused partway (a bad per-layer capacity): the model is as before, and an
    optimizer that later steps its weights after the user froze some of them is not warned."""
    from lorambo import configure_model

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16, dtype=DT), nn.Tanh(), nn.Linear(16, 3, dtype=DT))
    with pytest.raises(ValueError, match="capacity"):
        configure_model(model, {"0": 2, "2": 2}, capacity={"0": 4, "2": 99})
    model[0].requires_grad_(False)  # the user's own choice: train the last layer only
    opt = torch.optim.SGD([model[0].weight, *model[2].parameters()], lr=0.1)
    model(torch.randn(5, 8, dtype=DT)).square().sum().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()


def test_an_optimizer_of_unloaded_pools_is_told_it_trains_no_adapter():
    """A merge-and-restart (unload(merge=True), configure_model again) or a notebook's next
    experiment on the same model, with the optimizer of the first adapters kept: it steps pools
    no longer in the model, and the loss stays where it was. Its next step says so; an
    optimizer built afterwards is quiet and trains the new adapters."""
    from lorambo import configure_model, lora_layers, unload

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16, dtype=DT), nn.Tanh(), nn.Linear(16, 3, dtype=DT))
    configure_model(model, 2)
    old = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x, y = torch.randn(5, 8, dtype=DT), torch.randn(5, 3, dtype=DT)

    def step(optimizer):
        ((model(x) - y) ** 2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()

    for _ in range(2):
        step(old)
    unload(model, merge=True)
    configure_model(model, 3)
    pools = {n: (m.lora_A.detach().clone(), m.lora_B.detach().clone()) for n, m in lora_layers(model).items()}
    with pytest.warns(UserWarning, match=r"Adam holds 4 LoRA pools .* of layers that lorambo\.unload took out"):
        step(old)
    for n, m in lora_layers(model).items():  # what the warning is about: the adapters did not move
        assert torch.equal(m.lora_A, pools[n][0]) and torch.equal(m.lora_B, pools[n][1]), n
    new = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        step(new)
    assert all(not torch.equal(m.lora_B, pools[n][1]) for n, m in lora_layers(model).items())
