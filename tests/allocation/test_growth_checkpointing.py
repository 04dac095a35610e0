"""Online growth under gradient checkpointing. Non-reentrant checkpointing recomputes each layer's
forward during the backward; the recomputed output gets no gradient, so the capture kept a second
X per layer, unused, until the decision. It is dropped when the backward ends; the decision is the
one taken without checkpointing."""

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import lorambo
from lorambo.allocation.online import OnlineGrowth

DT = torch.float64


def _captured_decision(use_reentrant):
    """(inputs the capture still holds per layer, step 0's decision); None: no checkpointing."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 10, dtype=DT), nn.Tanh(), nn.Linear(10, 3, dtype=DT))
    model = lorambo.configure_model(net, 1, capacity={"0": 4, "2": 3})
    growth = OnlineGrowth(lorambo.lora_layers(model), budget=10_000, sketch_rank=2)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 6, generator=g, dtype=DT).requires_grad_()
    y = torch.randn(16, 3, generator=g, dtype=DT)
    with growth.capture:
        out = model(x) if use_reentrant is None else checkpoint(model, x, use_reentrant=use_reentrant)
        ((out - y) ** 2).mean().backward()
    held = {n: sum(t is not None for t in xs) for n, xs in growth.capture.inputs.items()}
    return held, growth.update(0)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_checkpointed_capture_holds_one_input_per_call_and_decides_the_same(use_reentrant):
    plain_held, plain = _captured_decision(None)
    held, decision = _captured_decision(use_reentrant)
    assert plain_held == {"0": 1, "2": 1} and held == plain_held
    assert plain and decision == plain
