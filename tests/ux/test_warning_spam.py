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
