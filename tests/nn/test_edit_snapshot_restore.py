"""A rank edit taken back (lorambo/nn/edit_snapshot.py: under DDP, when another process could not
make it) leaves the layers, pools, gradients and optimizer state as they were. A gradient that
was a tensor and that the failed edit set to None stayed None (the next step skipped those
pools), and optimizer state the failed edit created for pools that had none stayed (Adam's
first step on them then used its second step's bias correction)."""

import copy

import torch
from torch import nn

import lorambo
from lorambo.nn.edit_snapshot import EditSnapshot
from lorambo.nn.pool_ops import keep_components_many

DT = torch.float64


def _trained():
    """Two layers and Adam after one step that gave only layer '0' state; then a gradient on
    layer '0' lora_A alone (lora_B's is None) and on both pools of layer '2'."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 10, dtype=DT), nn.Tanh(), nn.Linear(10, 3, dtype=DT))
    model = lorambo.configure_model(net, 2, capacity={"0": 4, "2": 3})
    for layer in lorambo.lora_layers(model).values():
        with torch.no_grad():
            layer.lora_B.normal_(generator=torch.Generator().manual_seed(layer.lora_B.numel()))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 6, generator=g, dtype=DT), torch.randn(8, 3, generator=g, dtype=DT)
    layers = lorambo.lora_layers(model)
    ((model(x) - y) ** 2).mean().backward()
    layers["2"].lora_A.grad = layers["2"].lora_B.grad = None  # Adam gives them no state
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    ((model(x) - y) ** 2).mean().backward()
    layers["0"].lora_B.grad = None
    return model, optimizer, layers, (x, y)


def _failed_edit(layers, optimizer):
    """What a rank edit and the user's code around it may change before another process fails."""
    keep_components_many([(layers["0"], [1]), (layers["2"], [1, 0])], optimizer)
    layers["0"].lora_A.grad = None                                   # a tensor before
    layers["0"].lora_B.grad = torch.randn_like(layers["0"].lora_B)  # None before
    optimizer.step()                                                 # state for layer '2' too
    optimizer.zero_grad(set_to_none=False)


def _next_step(model, optimizer, x, y):
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    ((model(x) - y) ** 2).mean().backward()
    optimizer.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_a_taken_back_edit_restores_grads_none_ness_and_optimizer_state():
    model, optimizer, layers, (x, y) = _trained()
    reference_model, reference_optimizer = copy.deepcopy((model, optimizer))
    for param, ref in zip(model.parameters(), reference_model.parameters()):  # deepcopy leaves .grad out
        ref.grad = None if param.grad is None else param.grad.clone()
    grads_before = {n: p.grad for n, p in model.named_parameters()}
    snapshot = EditSnapshot.of_pools(layers.values(), [optimizer])
    _failed_edit(layers, optimizer)
    snapshot.restore()

    reference = dict(reference_model.named_parameters())
    for name, param in model.named_parameters():
        ref = reference[name]
        torch.testing.assert_close(param, ref, rtol=0, atol=0)
        assert (param.grad is None) == (ref.grad is None), name
        assert param.grad is grads_before[name], name  # the same gradient object (a DDP bucket view)
        if ref.grad is not None:
            torch.testing.assert_close(param.grad, ref.grad, rtol=0, atol=0)
        assert (param in optimizer.state) == (ref in reference_optimizer.state), name
        if ref in reference_optimizer.state:
            state, ref_state = optimizer.state[param], reference_optimizer.state[ref]
            assert set(state) == set(ref_state), name
            for key, value in ref_state.items():
                torch.testing.assert_close(state[key], value, rtol=0, atol=0)
    assert {n: m.rank for n, m in layers.items()} == {n: m.rank for n, m in lorambo.lora_layers(reference_model).items()}

    after = _next_step(model, optimizer, x, y)
    expected = _next_step(reference_model, reference_optimizer, x, y)
    for name, value in expected.items():
        torch.testing.assert_close(after[name], value, rtol=0, atol=0)
