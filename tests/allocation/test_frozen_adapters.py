"""A layer whose lora_B is frozen mid-training is left out of rank decisions: online growth,
rank moves and ALoRA rounds take the decisions they take without it, and leave it as it was.

Reference: the same decision on a copy of the model over the other layers alone, with the budget
the frozen layer holds taken off. The frozen layer comes last, so the other layers keep their
index (which seeds their sketches and new rows) and the decisions agree bit for bit."""

import copy

import pytest
import torch

import lorambo
from lorambo.allocation.alora import alora_round
from lorambo.allocation.online import OnlineGrowth

from residual_net import ResidualNet, mse

DT = torch.float64

pytestmark = pytest.mark.usefixtures("one_thread")


def _trained_model(ranks, capacity):
    torch.manual_seed(0)
    model = lorambo.configure_model(ResidualNet(width=8, hidden=12), ranks, capacity=capacity)
    gen = torch.Generator().manual_seed(1)
    for layer in lorambo.lora_layers(model).values():
        layer.lora_B.data[:, :layer.rank].normal_(generator=gen)
    return model


def _spent(layers):
    return sum((m.in_features + m.out_features) * m.rank for m in layers.values())


def _assert_same_pools(got, want):
    for (name, a), (_, b) in zip(lorambo.lora_layers(got).items(), lorambo.lora_layers(want).items()):
        assert a.rank == b.rank, name
        assert torch.equal(a.lora_A, b.lora_A) and torch.equal(a.lora_B, b.lora_B), name


def _decide(model, layers, budget, batch, scores=None):
    grower = OnlineGrowth(layers, budget, sketch_rank=2, power_iters=3, seed=3,
                          move_threshold=None if scores is None else 1.0, max_moves=2)
    with grower.capture:
        mse(model, batch).backward()
    return grower.update(step=5, component_scores=scores)


@pytest.mark.parametrize("room, moves", [(6, False), (0, True)])
def test_online_growth_and_moves_leave_a_frozen_adapter_alone(room, moves):
    model = _trained_model(2, capacity=6)
    layers = lorambo.lora_layers(model)
    frozen = list(layers)[-1]
    layers[frozen].lora_B.requires_grad_(False)  # frozen mid-training: a new slot there never trains
    reference = copy.deepcopy(model)
    ref_layers = {n: m for n, m in lorambo.lora_layers(reference).items() if n != frozen}
    gen = torch.Generator().manual_seed(2)
    batch = (torch.randn(16, 8, generator=gen, dtype=DT), torch.randn(16, 8, generator=gen, dtype=DT))
    # room for `room` more ranks; with moves the frozen layer's components score the worst.
    # Before, it took rank there, and gave its components to the others
    budget = _spent(layers) + room * (8 + 12)
    scores = None
    if moves:
        scores = {n: torch.tensor([0.5, 0.6], dtype=DT) for n in layers}
        scores[frozen] = torch.tensor([-1.0, -2.0], dtype=DT)
    records = _decide(model, layers, budget, batch, scores)
    ref_records = _decide(reference, ref_layers, budget - _spent({frozen: layers[frozen]}), batch,
                          None if scores is None else {n: s for n, s in scores.items() if n != frozen})
    without_spend = [{k: v for k, v in r.items() if k not in ("spent", "budget")} for r in records]
    assert without_spend == [{k: v for k, v in r.items() if k not in ("spent", "budget")} for r in ref_records]
    assert {r["event"] for r in records} == ({"grow", "shrink"} if moves else {"grow"})
    assert all(r["layer"] != frozen for r in records)
    _assert_same_pools(model, reference)
    assert layers[frozen].rank == 2


def test_alora_round_leaves_a_frozen_adapter_alone():
    model = _trained_model(3, capacity=6)
    layers = lorambo.lora_layers(model)
    names = list(layers)
    frozen = names[-1]
    layers[frozen].lora_B.requires_grad_(False)
    reference = copy.deepcopy(model)
    ref_layers = {n: m for n, m in lorambo.lora_layers(reference).items() if n != frozen}
    scores = {n: torch.tensor([1.0, 1.5, 2.0], dtype=DT) + i for i, n in enumerate(names)}
    scores[frozen] = torch.tensor([-1.0, 9.0, 9.0], dtype=DT)  # worst component, most important layer
    budget = 10**6
    records = alora_round(model, layers, mse, None, n_prune=2, budget=budget, scores=scores, step=4)
    ref_records = alora_round(reference, ref_layers, mse, None, n_prune=2,
                              budget=budget - _spent({frozen: layers[frozen]}),
                              scores={n: s for n, s in scores.items() if n != frozen}, step=4)
    assert records == ref_records and {r["event"] for r in records} == {"grow", "shrink"}
    _assert_same_pools(model, reference)
    assert layers[frozen].rank == 3


def test_lora_fa_layers_with_frozen_a_still_grow():
    # LoRA-FA trains B on a fixed A: new slots train through B, so the layer still takes rank
    model = _trained_model(1, capacity=4)
    layers = lorambo.lora_layers(model)
    for layer in layers.values():
        layer.lora_A.requires_grad_(False)
    gen = torch.Generator().manual_seed(3)
    batch = (torch.randn(16, 8, generator=gen, dtype=DT), torch.randn(16, 8, generator=gen, dtype=DT))
    records = _decide(model, layers, 10**6, batch)
    assert {r["layer"] for r in records} == set(layers)
