"""Online growth's capture keeps the dY of the passes that feed ``.grad`` only. A
``torch.autograd.grad`` pass inside the captured step (an adversarial example's input gradient, a
Hessian-vector product after ``backward(create_graph=True)``) reached the output hooks too, and
its dY was summed in: G = sum dY^T X then held a gradient the optimizer never sees. The reference
is the frozen base weight's own gradient (G of the layer), from a twin whose base weights train."""

import copy

import pytest
import torch
from torch import nn

import lorambo
from lorambo.allocation.online import ActivationCapture

DT = torch.float64

pytestmark = pytest.mark.usefixtures("one_thread")


def _model():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 7, dtype=DT), nn.Tanh(), nn.Linear(7, 3, dtype=DT))
    model = lorambo.configure_model(net, 2, capacity=3)
    with torch.no_grad():
        for layer in lorambo.lora_layers(model).values():
            layer.lora_B.normal_()
    return model


def _step(model, kind, x, y):
    """One training step with an extra pass that does not feed .grad (or passes naming one layer)."""
    def loss_of(inputs):
        out = model(inputs)
        return ((out - y) ** 2).sum() + out.abs().sum()

    if kind == "adversarial":  # FGSM: the input gradient of the clean loss, then train on x_adv
        xx = x.clone().requires_grad_()
        (gx,) = torch.autograd.grad(loss_of(xx), xx)
        loss_of(x + 0.3 * gx.sign()).backward()
    elif kind == "hvp":  # the gradient with its graph, then H v of the pools by torch.autograd.grad
        pools = [p for p in model.parameters() if p.requires_grad]
        loss_of(x).backward(create_graph=True)
        probe = [torch.randn_like(p) for p in pools]
        torch.autograd.grad(sum((p.grad * v).sum() for p, v in zip(pools, probe)), pools)
    elif kind == "inputs":  # backward(inputs=...) feeds the named layer's pools only
        loss_of(x).backward(inputs=[p for p in model[0].parameters() if p.requires_grad])


@pytest.mark.parametrize("kind", ["adversarial", "hvp", "inputs"])
def test_capture_holds_the_gradient_of_the_passes_that_feed_grad(kind):
    model = _model()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(9, 5, generator=g, dtype=DT), torch.randn(9, 3, generator=g, dtype=DT)
    twin = copy.deepcopy(model)
    bases = [twin[0].base_layer.weight, twin[2].base_layer.weight]
    for w in bases:
        w.requires_grad_(True)
    _step(twin, kind, x, y)
    layers = lorambo.lora_layers(model)
    capture = ActivationCapture(layers)
    with capture:
        _step(model, kind, x, y)
    for name, w in zip(("0", "2"), bases):
        pairs = capture.pairs(name)
        if w.grad is None:  # a layer the step did not train: nothing captured for it
            assert kind == "inputs" and name == "2" and pairs == []
            continue
        assert len(pairs) == 1
        (x_call, dy), = pairs
        torch.testing.assert_close(dy.T @ x_call, w.grad, rtol=1e-12, atol=1e-12)
