"""The parameters a hooked call read (lorambo/nn/grad_passes.py's CallParameters) are dropped when
the call ends, also when it raises. Non-reentrant activation checkpointing stops each
recomputation by raising inside the segment's last layer: online growth's capture and an attached
FisherProxy kept one more list of parameters per step for it (3 after 3 steps), and a forward
that raised (a wrong input shape, an out-of-memory retry) kept one per failed call."""

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import lorambo
from lorambo.allocation.online import OnlineGrowth
from lorambo.nn.grad_passes import CallParameters
from lorambo.sensitivity.fisher import FisherProxy

DT = torch.float64


def _model():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 10, dtype=DT), nn.Tanh(), nn.Linear(10, 3, dtype=DT))
    return lorambo.configure_model(net, 2, capacity={"0": 4, "2": 3})


def _captures(model):
    """(statistics object, its CallParameters, how to attach, how to detach) for each capture."""
    growth = OnlineGrowth(lorambo.lora_layers(model), budget=10_000, sketch_rank=2)
    proxy = FisherProxy(model)
    return {"growth": (growth.capture._call_params, growth.capture.arm, growth.capture.disarm),
            "fisher": (proxy._call_params, proxy.attach, proxy.detach)}


@pytest.mark.parametrize("which", ["growth", "fisher"])
def test_checkpointed_steps_and_raising_forwards_leave_no_call_behind(which):
    model = _model()
    calls, attach, detach = _captures(model)[which]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 6, generator=g, dtype=DT).requires_grad_()
    attach()
    try:
        for _ in range(3):
            checkpoint(model, x, use_reentrant=False).sum().backward()
        assert calls._calls == {}
        for bad, error, match in (
                (torch.randn(8, 5, generator=g, dtype=DT), ValueError, r"'0': input has last dim 5 .*in_features = 6"),
                (torch.randn(8, 6, generator=g, dtype=torch.float32), TypeError,
                 r"'0': input dtype torch\.float32 does not match weight dtype torch\.float64")):
            with pytest.raises(error, match=match):
                model(bad)
        assert calls._calls == {}
    finally:
        detach()


def test_a_call_raising_inside_another_call_of_the_layer_gives_the_outer_call_its_own_parameters():
    """A layer's forward that calls the layer again, and catches its failure: the outer call's
    forward hook reads the outer call's parameters, not the failed inner call's."""
    layer = lorambo.lora_layers(_model())["0"]
    calls, seen, inner = CallParameters(), [], {"raise": True}

    def forward_hook(module, args, kwargs, output):
        seen.append(calls.current(module))

    calls.register(layer, forward_hook)
    outer_params = [p for p in layer.parameters() if p.requires_grad]

    def pre(module, args):
        if inner.pop("raise", False):  # first call only: a nested call that fails
            module.lora_A.requires_grad_(False)
            try:
                module(torch.randn(2, 5, dtype=DT))
            except ValueError:
                pass
            module.lora_A.requires_grad_(True)

    layer.register_forward_pre_hook(pre)
    layer(torch.randn(2, 6, dtype=DT))
    assert len(seen) == 1 and len(seen[0]) == len(outer_params)
    assert all(a is b for a, b in zip(seen[0], outer_params))
    assert calls._calls == {}
