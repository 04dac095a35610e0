"""Rank decisions (online growth with moves, ALoRA rounds, configure_model) given a list of
optimizers, one per parameter, edit each one's state for the pools it holds.

Reference: the same decision and the next step with one optimizer over every parameter; in
float64 the pools and every optimizer state tensor agree in every slot, and no optimizer is
reported left behind."""

import copy
import warnings

import pytest
import torch

import lorambo
from lorambo.allocation.alora import alora_round
from lorambo.allocation.online import OnlineGrowth
from lorambo.nn import StaleOptimizerStateWarning

from residual_net import ResidualNet, mse

DT = torch.float64

pytestmark = pytest.mark.usefixtures("one_thread")


def _grow_and_move(model, layers, optimizer, batch):
    scores = {n: torch.tensor([0.2, 0.5 + i], dtype=DT) for i, n in enumerate(layers)}  # slot 0 worst: slot 1 moves
    grower = OnlineGrowth(layers, _spent(layers), sketch_rank=2, power_iters=3, seed=3,
                          move_threshold=1.0, max_moves=2)
    with grower.capture:
        mse(model, batch).backward()
    return grower.update(step=5, optimizer=optimizer, component_scores=scores)


def _alora(model, layers, optimizer, batch):
    mse(model, batch).backward()
    scores = {n: torch.tensor([0.5, 1.0 + i], dtype=DT) for i, n in enumerate(layers)}
    return alora_round(model, layers, mse, None, n_prune=2, budget=10**6, optimizer=optimizer, scores=scores,
                       step=4)


def _configure(model, layers, optimizer, batch):
    mse(model, batch).backward()
    lorambo.configure_model(model, {"blocks.0.up": 3, "blocks.1.down": 1}, optimizer=optimizer)
    return [layer.rank for layer in layers.values()]


DECISIONS = {"online growth with moves": _grow_and_move, "ALoRA round": _alora, "configure_model": _configure}


def _spent(layers):
    return sum((m.in_features + m.out_features) * m.rank for m in layers.values())


def _batches():
    gen = torch.Generator().manual_seed(2)
    return [(torch.randn(16, 8, generator=gen, dtype=DT), torch.randn(16, 8, generator=gen, dtype=DT))
            for _ in range(4)]


def _run(decide, one_per_parameter):
    torch.manual_seed(0)
    model = lorambo.configure_model(ResidualNet(width=8, hidden=12), 2, capacity=4)
    params = [p for p in model.parameters() if p.requires_grad]
    make = lambda ps: lorambo.optim.AdamW(ps, lr=0.05, weight_decay=0.01)  # noqa: E731
    optimizers = [make([p]) for p in params] if one_per_parameter else [make(params)]
    layers = lorambo.lora_layers(model)
    batches = _batches()
    for batch in batches[:2]:
        mse(model, batch).backward()
        for opt in optimizers:
            opt.step()
            opt.zero_grad()
    records = decide(model, layers, optimizers if one_per_parameter else optimizers[0], batches[2])
    for opt in optimizers:  # the decision came between backward() and step()
        opt.step()
        opt.zero_grad()
    mse(model, batches[3]).backward()
    for opt in optimizers:
        opt.step()
    state = {name: {k: v for opt in optimizers for k, v in opt.state[p].items()}
             for name, p in model.named_parameters() if p.requires_grad}
    return records, model, state


@pytest.mark.parametrize("name", DECISIONS)
def test_decisions_given_one_optimizer_per_parameter_edit_every_one(name):
    with warnings.catch_warnings():
        warnings.simplefilter("error", StaleOptimizerStateWarning)
        records, model, state = _run(DECISIONS[name], one_per_parameter=True)
    ref_records, reference, ref_state = _run(DECISIONS[name], one_per_parameter=False)
    assert records == ref_records
    ranks = [layer.rank for layer in lorambo.lora_layers(model).values()]
    assert ranks == [layer.rank for layer in lorambo.lora_layers(reference).values()] and ranks != [2] * 4
    for (pname, param), ref in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(param, ref, rtol=1e-12, atol=1e-14, msg=pname)
    assert state.keys() == ref_state.keys()
    for pname, values in ref_state.items():
        assert state[pname].keys() == values.keys(), pname
        for key, value in values.items():
            torch.testing.assert_close(state[pname][key], value, rtol=1e-12, atol=1e-14, msg=f"{pname} {key}")
