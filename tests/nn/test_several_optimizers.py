"""Rank changes given a list of optimizers edit each one's state for the pools it holds.

The case: torch's "optimizer step in backward" (one optimizer per parameter, stepped from
``register_post_accumulate_grad_hook``). Reference: the same training with one optimizer over
every parameter, which a rank change edits as a whole. In float64 both runs must agree in every
slot of every pool and of every optimizer state tensor, across a growth, a shrink, a permutation
and a move between layers, with no stale-state warning."""

import warnings

import pytest
import torch
from torch import nn

import lorambo
from lorambo import LoRAMBoLinear
from lorambo.nn import StaleOptimizerStateWarning, keep_components_many

DT = torch.float64

pytestmark = pytest.mark.usefixtures("one_thread")

MAKERS = {
    "lorambo AdamW": lambda params: lorambo.optim.AdamW(params, lr=0.05, weight_decay=0.01),
    # dampening: a new slot's buffer starts at its first update (lorambo/nn/fresh_momentum.py)
    "SGD momentum dampening": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, dampening=0.3,
                                                             weight_decay=0.01),
}


def _model():
    torch.manual_seed(0)
    return nn.Sequential(LoRAMBoLinear(nn.Linear(6, 5, dtype=DT), 2, capacity=4, name="first"), nn.Tanh(),
                         LoRAMBoLinear(nn.Linear(5, 4, dtype=DT), 2, capacity=4, name="second"))


def _steps_in_backward(model, make):
    """One optimizer per trainable parameter, stepped (and its gradient freed) as soon as the
    parameter's gradient is accumulated."""
    optimizers = {p: make([p]) for p in model.parameters() if p.requires_grad}

    def step(param):
        optimizers[param].step()
        optimizers[param].zero_grad(set_to_none=True)

    for param in optimizers:
        param.register_post_accumulate_grad_hook(step)
    return optimizers


def _change_ranks(model, step, optimizer):
    first, second = model[0], model[2]
    if step == 2:
        first.set_rank(3, optimizer=optimizer, generator=torch.Generator().manual_seed(5))
    elif step == 4:
        second.set_rank(1, optimizer=optimizer)
    elif step == 5:
        first.keep_components([1, 2, 0], optimizer=optimizer)
    elif step == 6:  # a move: a component of the first layer is dropped to fund one in the second
        keep_components_many([(first, [2, 0])], optimizer=optimizer)
        second.set_rank(2, optimizer=optimizer, generator=torch.Generator().manual_seed(6))


def _batches():
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 6, generator=gen, dtype=DT), torch.randn(8, 4, generator=gen, dtype=DT))
            for _ in range(9)]


@pytest.mark.parametrize("kind", MAKERS)
def test_optimizer_step_in_backward_follows_rank_changes_like_one_optimizer(kind):
    make = MAKERS[kind]
    model, reference = _model(), _model()
    per_param = _steps_in_backward(model, make)
    single = make([p for p in reference.parameters() if p.requires_grad])
    with warnings.catch_warnings():
        warnings.simplefilter("error", StaleOptimizerStateWarning)  # before, the others were left behind
        for step, (x, y) in enumerate(_batches()):
            _change_ranks(model, step, list(per_param.values()))
            _change_ranks(reference, step, single)
            (model(x) - y).pow(2).mean().backward()  # steps every optimizer
            (reference(x) - y).pow(2).mean().backward()
            single.step()
            single.zero_grad(set_to_none=True)
    assert [model[0].rank, model[2].rank] == [reference[0].rank, reference[2].rank] == [2, 2]
    for (name, param), ref in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(param, ref, rtol=1e-12, atol=1e-14, msg=name)
        if not param.requires_grad:
            continue
        state, ref_state = per_param[param].state[param], single.state[ref]
        assert state.keys() == ref_state.keys(), name
        for key, value in ref_state.items():
            torch.testing.assert_close(state[key], value, rtol=1e-12, atol=1e-14, msg=f"{name} {key}")
    for layer in (model[0], model[2]):  # inactive slots stayed exactly zero
        assert not layer.lora_A[layer.rank:].any() and not layer.lora_B[:, layer.rank:].any()


def _trained_layer():
    torch.manual_seed(0)
    layer = LoRAMBoLinear(nn.Linear(6, 5, dtype=DT), 3, capacity=4, name="fc")
    optimizer = torch.optim.Adam(layer.parameters(), lr=0.05)
    for _ in range(2):
        layer(torch.randn(4, 6, dtype=DT)).pow(2).sum().backward()
        optimizer.step()
    return layer, optimizer


def test_an_optimizer_listed_twice_moves_its_state_once():
    layer, optimizer = _trained_layer()
    before = {key: value.clone() for key, value in optimizer.state[layer.lora_B].items()}
    layer.keep_components([2, 0], optimizer=[optimizer, optimizer])  # moved twice, [2, 0] would come back as [0, 2]
    for key in ("exp_avg", "exp_avg_sq"):
        want = torch.cat([before[key][:, [2, 0]], torch.zeros(5, 2, dtype=DT)], dim=1)
        assert torch.equal(optimizer.state[layer.lora_B][key], want), key


def test_a_listed_optimizer_holding_the_pools_among_other_parameters_moves_their_state():
    layer, optimizer = _trained_layer()  # Adam over the pools and the frozen base weight and bias
    assert len(optimizer.param_groups[0]["params"]) > 2
    other = torch.optim.SGD([nn.Parameter(torch.ones(3, dtype=DT))], lr=0.1)  # holds none of the layer's pools
    before = {p: {key: value.clone() for key, value in optimizer.state[p].items()} for p in (layer.lora_A, layer.lora_B)}
    layer.keep_components([2, 0], optimizer=[other, optimizer])
    for key in ("exp_avg", "exp_avg_sq"):
        want_a = torch.cat([before[layer.lora_A][key][[2, 0]], torch.zeros(2, 6, dtype=DT)])
        want_b = torch.cat([before[layer.lora_B][key][:, [2, 0]], torch.zeros(5, 2, dtype=DT)], dim=1)
        assert torch.equal(optimizer.state[layer.lora_A][key], want_a), key
        assert torch.equal(optimizer.state[layer.lora_B][key], want_b), key
    assert not other.state


def test_an_empty_optimizer_list_is_refused_before_any_change():
    layer, optimizer = _trained_layer()
    with pytest.raises(ValueError, match=r"LoRAMBoLinear 'fc'.set_rank: optimizer is an empty list"):
        layer.set_rank(1, optimizer=[])
    assert layer.rank == 3 and layer.lora_A[2].any()
