"""A long run warns once per cause, not at every step, and still warns for a new cause."""

import warnings

import torch
from torch import nn

import lorambo


def _setup():
    torch.manual_seed(0)
    model = lorambo.configure_model(nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4)), 1, capacity=4)
    g = torch.Generator().manual_seed(2)
    batch = torch.randn(8, 6, generator=g), torch.randn(8, 4, generator=g)
    return model, batch, (lambda m, b: (m(b[0]) - b[1]).pow(2).mean())


def test_a_loop_without_capture_warns_once_per_cause():
    """Every decision step of a loop that never used capture() warned again (the step number made
    each message new, so the default filter showed all of them: 30 warnings in 30 steps)."""
    model, batch, loss_fn = _setup()
    opt = lorambo.LoRAMBoOptimizer(model, total_budget=10_000, interval=1)
    adamw = opt.make_optimizer(lr=1e-2)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("default")
        for step in range(30):
            loss_fn(model, batch).backward()       # no opt.capture(step)
            assert opt.step(step) == []
            adamw.step()
            adamw.zero_grad()
        with opt.capture(30):                       # a different mistake: the forward without backward
            loss_fn(model, batch)
        assert opt.step(30) == []
        adamw.zero_grad()
        with opt.capture(31):                       # fixed: the decision is taken
            loss_fn(model, batch).backward()
        assert opt.step(31)
    messages = [str(w.message) for w in record if "is a rank decision step" in str(w.message)]
    assert len(messages) == 2, messages
    assert messages[0].startswith("step 0 is a rank decision step but no activations were captured")
    assert messages[1].startswith("step 30 is a rank decision step but no gradient reached the layers")
    assert all("without another warning" in m for m in messages)


def test_fsdp_sgd_dampening_warns_once_per_optimizer_not_per_layer_and_growth():
    """Through lorambo.integrations.fsdp, SGD with dampening warned for every layer at every rank
    change (3 layers x 4 growths: 12 warnings under "always", one per layer even under "default")."""
    from lorambo.integrations import fsdp

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8))
    model = lorambo.configure_model(net, 1, capacity=8)
    layers = list(lorambo.lora_layers(model).values())
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(8, 8, generator=g), torch.randn(8, 8, generator=g)
    sgd = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9, dampening=0.5)
    other = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9, dampening=0.5)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for rank in range(2, 6):
            (model(x) - y).pow(2).mean().backward()
            sgd.step()
            for layer in layers:
                fsdp.set_rank(layer, rank, optimizer=sgd)
            sgd.zero_grad()
        (model(x) - y).pow(2).mean().backward()
        other.step()
        fsdp.set_rank(layers[0], 6, optimizer=other)  # another optimizer: told too
    told = [str(w.message) for w in record if "dampening > 0" in str(w.message)]
    assert len(told) == 2, told
    assert all("warned once per optimizer" in m for m in told)
    assert [layer.rank for layer in layers] == [6, 5, 5]
