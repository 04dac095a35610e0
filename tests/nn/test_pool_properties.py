"""Property test: random rank changes between backward() and step() under real optimizers.

Each example runs a random sequence of: backward, a rank change of a random kind on random layers
(grow, shrink, keep_components, a move between layers through keep_components_many), then an
optimizer step. After every step: inactive slots are exactly zero, gradients sat in the slots of
their components, the model computes the same function as freshly built layers holding only the
active weights, and with lorambo.optim.AdamW every active slot's parameters, moments and step
count equal those of an independent per-component Adam written out in float64 below.
"""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import lorambo
from lorambo.nn import keep_components_many

LR, BETAS, EPS, WD = 0.05, (0.9, 0.999), 1e-8, 0.01
OPTIMIZERS = {
    "lorambo_adamw": lambda ps: lorambo.optim.AdamW(ps, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD),
    "torch_adamw": lambda ps: torch.optim.AdamW(ps, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD),
    "sgd_momentum": lambda ps: torch.optim.SGD(ps, lr=LR, momentum=0.9),
}
DIMS = [(6, 5), (5, 4)]
CAPACITY = 4


class Component:
    """One rank-1 component as a per-component AdamW sees it (float64)."""

    def __init__(self, a, b):
        self.a, self.b = a.clone(), b.clone()
        self.m = [torch.zeros_like(a), torch.zeros_like(b)]
        self.v = [torch.zeros_like(a), torch.zeros_like(b)]
        self.t, self.grads = 0, [torch.zeros_like(a), torch.zeros_like(b)]

    def adamw_step(self):
        self.t += 1
        bc1, bc2 = 1 - BETAS[0] ** self.t, 1 - BETAS[1] ** self.t
        new = []
        for p, g, m, v in zip((self.a, self.b), self.grads, self.m, self.v):
            m.mul_(BETAS[0]).add_(g, alpha=1 - BETAS[0])
            v.mul_(BETAS[1]).addcmul_(g, g, value=1 - BETAS[1])
            p = p * (1 - LR * WD)
            new.append(p - (LR / bc1) * m / (v.sqrt() / math.sqrt(bc2) + EPS))
        self.a, self.b = new


def _model(ranks):
    layers = [lorambo.LoRAMBoLinear(nn.Linear(i, o, dtype=torch.float64), rank=r, capacity=CAPACITY)
              for (i, o), r in zip(DIMS, ranks)]
    with torch.no_grad():
        for layer in layers:
            layer.lora_B[:, :layer.rank].normal_()
    return layers


def _forward(layers, x):
    return layers[1](torch.tanh(layers[0](x)))


def _fresh_copy_output(layers, x):
    """The same function from new layers whose pools hold exactly the active weights."""
    fresh = []
    for layer in layers:
        r = layer.rank
        new = lorambo.LoRAMBoLinear(layer.base_layer, rank=r, capacity=max(r, 1), scaling=layer.scaling)
        with torch.no_grad():
            new.lora_A[:r].copy_(layer.lora_A[:r])
            new.lora_B[:, :r].copy_(layer.lora_B[:, :r])
        fresh.append(new)
    return _forward(fresh, x)


def _change(kind, layers, comps, i, data, opt):
    """Apply one rank change to ``layers[i]`` (and mirror it on the components)."""
    layer, other = layers[i], layers[1 - i]
    r = layer.rank
    if kind == "grow" and r < CAPACITY:
        layer.set_rank(data.draw(st.integers(r + 1, CAPACITY)), optimizer=opt)
        comps[i] += [Component(layer.lora_A.detach()[j], layer.lora_B.detach()[:, j]) for j in range(r, layer.rank)]
    elif kind == "shrink" and r > 0:
        layer.set_rank(data.draw(st.integers(0, r - 1)), optimizer=opt)
        comps[i] = comps[i][:layer.rank]
    elif kind == "keep" and r > 0:
        keep = data.draw(st.permutations(range(r)))[:data.draw(st.integers(0, r))]
        layer.keep_components(keep, optimizer=opt)
        comps[i] = [comps[i][j] for j in keep]
    elif kind == "move" and r > 0 and other.rank < CAPACITY:
        drop = data.draw(st.integers(0, r - 1))
        keep = [j for j in range(r) if j != drop]
        keep_components_many([(layer, keep)], opt)
        comps[i] = [comps[i][j] for j in keep]
        o = other.rank
        other.set_rank(o + 1, optimizer=opt)
        comps[1 - i].append(Component(other.lora_A.detach()[o], other.lora_B.detach()[:, o]))


def _check_gradients_sit_with_their_components(layers, comps):
    for layer, layer_comps in zip(layers, comps):
        r = layer.rank
        for j, comp in enumerate(layer_comps):
            assert torch.equal(layer.lora_A.grad[j], comp.grads[0])
            assert torch.equal(layer.lora_B.grad[:, j], comp.grads[1])
        assert not layer.lora_A.grad[r:].any() and not layer.lora_B.grad[:, r:].any()


def _check_state_is_per_slot_adam(layers, comps, opt):
    for layer, layer_comps in zip(layers, comps):
        a_state, b_state = opt.state.get(layer.lora_A, {}), opt.state.get(layer.lora_B, {})
        for j, comp in enumerate(layer_comps):
            close = dict(rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(layer.lora_A.detach()[j], comp.a, **close)
            torch.testing.assert_close(layer.lora_B.detach()[:, j], comp.b, **close)
            if comp.t == 0:
                continue
            torch.testing.assert_close(a_state["exp_avg"][j], comp.m[0], **close)
            torch.testing.assert_close(a_state["exp_avg_sq"][j], comp.v[0], **close)
            torch.testing.assert_close(b_state["exp_avg"][:, j], comp.m[1], **close)
            torch.testing.assert_close(b_state["exp_avg_sq"][:, j], comp.v[1], **close)
            assert a_state["slot_step"][j] == b_state["slot_step"][j] == comp.t


@pytest.mark.parametrize("optimizer_name", list(OPTIMIZERS))
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_rank_changes_between_backward_and_step(optimizer_name, data):
    torch.manual_seed(data.draw(st.integers(0, 2**16), label="seed"))
    layers = _model([data.draw(st.integers(0, CAPACITY)) for _ in DIMS])
    opt = OPTIMIZERS[optimizer_name]([p for layer in layers for p in layer.parameters() if p.requires_grad])
    comps = [[Component(layer.lora_A.detach()[j], layer.lora_B.detach()[:, j]) for j in range(layer.rank)]
             for layer in layers]
    for _ in range(data.draw(st.integers(1, 6), label="steps")):
        x = torch.randn(3, DIMS[0][0], dtype=torch.float64)
        (_forward(layers, x) * torch.randn(3, DIMS[1][1], dtype=torch.float64)).sum().backward()
        for layer, layer_comps in zip(layers, comps):
            for j, comp in enumerate(layer_comps):
                comp.grads = [layer.lora_A.grad[j].clone(), layer.lora_B.grad[:, j].clone()]
        for _ in range(data.draw(st.integers(0, 2), label="changes")):
            kind = data.draw(st.sampled_from(["grow", "shrink", "keep", "move"]), label="kind")
            _change(kind, layers, comps, data.draw(st.integers(0, 1), label="layer"), data, opt)
        _check_gradients_sit_with_their_components(layers, comps)
        opt.step()
        opt.zero_grad()
        for layer in layers:
            assert not layer.lora_A[layer.rank:].any() and not layer.lora_B[:, layer.rank:].any()
        probe = torch.randn(4, DIMS[0][0], dtype=torch.float64)
        torch.testing.assert_close(_forward(layers, probe), _fresh_copy_output(layers, probe), rtol=1e-12, atol=1e-12)
        if optimizer_name == "lorambo_adamw":
            for layer_comps in comps:
                for comp in layer_comps:
                    comp.adamw_step()
            _check_state_is_per_slot_adam(layers, comps, opt)
