"""Rank moves go one way per layer (lorambo/allocation/move_directions.py): a layer that received a
rank by a move never gives one, and a layer that gave one is neither grown nor moved into again,
over a whole run and across a resume (the ways are read from the decision log)."""

import pytest
import torch
from torch import nn

import lorambo
from lorambo import LoRAMBoOptimizer
from lorambo.allocation.move_directions import move_directions
from lorambo.allocation.online import OnlineGrowth
from lorambo.allocation.report import DecisionLog
from lorambo.sensitivity.adalora_importance import AdaLoRAImportance

DT = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")


def _mlp(width, seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(width, width, dtype=DT), nn.Tanh(), nn.Linear(width, width, dtype=DT),
                         nn.Tanh(), nn.Linear(width, width, dtype=DT))


def test_move_directions_reads_only_rank_moves():
    records = [{"reason": "grow", "event": "grow", "layer": "a"},       # growth sets no way
               {"reason": "move", "event": "shrink", "layer": "b"},
               {"reason": "move", "event": "grow", "layer": "c"},
               {"reason": "alora", "event": "shrink", "layer": "d"},    # ALoRA rounds are not moves
               {"reason": "alora", "event": "grow", "layer": "e"}]
    assert move_directions(records) == ({"c"}, {"b"})


def _way(records, layer):
    return [r["event"] for r in records if r["layer"] == layer and r["reason"] == "move"]


def test_no_move_reverses_an_earlier_one_over_a_run():
    """A planted rank-4 delta in the middle layer; every component scores below move_threshold, so
    without the rule each decision moved out the component the previous one had grown."""
    width, interval = 16, 5
    teacher = _mlp(width, 0)
    student = _mlp(width, 0)
    with torch.no_grad():
        teacher[2].weight += 0.5 * torch.randn(width, 4, dtype=DT) @ torch.randn(4, width, dtype=DT) / width ** 0.5
    alloc = LoRAMBoOptimizer(student, total_budget=3 * 2 * 2 * width, sensitivity_method="frobenius", capacity=8,
                             interval=interval, warmup_steps=interval, sketch_rank=4, move_threshold=1e-3)
    alloc.configure({"0": 2, "2": 2, "4": 2})
    opt = alloc.make_optimizer(lr=3e-3)
    importance = AdaLoRAImportance(student)
    gen = torch.Generator().manual_seed(1)
    for step in range(16 * interval):
        x = torch.randn(32, width, dtype=DT, generator=gen)
        with alloc.capture(step):
            ((student(x) - teacher(x).detach()) ** 2).mean().backward()
        importance.update()
        importance.follow(alloc.step(step, opt, component_scores=importance.component_scores()))
        opt.step()
        opt.zero_grad()
    moves = [r for r in alloc.decisions if r["reason"] == "move"]
    assert len(moves) >= 4  # at least two moves, each a shrink and a grow
    for layer in ("0", "2", "4"):
        way = _way(alloc.decisions, layer)
        assert way in ([], ["grow"] * len(way), ["shrink"] * len(way)), (layer, way)
    # every move takes a rank from a layer that only gives: at most the ranks those layers held
    gave = {r["layer"] for r in moves if r["event"] == "shrink"}
    assert sum(r["event"] == "shrink" for r in moves) <= 2 * len(gave)
    assert sum(m.rank for m in lorambo.lora_layers(student).values()) == 6


def _capture(grower, net, seed):
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(16, 8, dtype=DT, generator=gen), torch.randn(16, 8, dtype=DT, generator=gen)
    with grower.capture:
        ((net(x) - y) ** 2).mean().backward()


def _grower(log, budget_slack, **kwargs):
    net = _mlp(8, 3)
    layers = lorambo.lora_layers(lorambo.configure_model(net, {"0": 2, "2": 2, "4": 2}, capacity=4))
    spent = sum(2 * (m.in_features + m.out_features) for m in layers.values())
    grower = OnlineGrowth(layers, spent + budget_slack, sketch_rank=1, log=log, **kwargs)
    _capture(grower, net, 4)
    return grower, layers, net


def _logged(*records):
    log = DecisionLog()
    log.extend([dict(step=0, reason="move", layer=layer, event=event, old_rank=2, new_rank=2)
                for layer, event in records])
    return log


def test_a_layer_that_received_by_a_move_is_no_donor_though_it_scores_lowest():
    scores = {"0": [0.0, 0.0], "2": [1e-3, 2e-3], "4": [1e-2, 2e-2]}
    grower, layers, _ = _grower(_logged(("0", "grow")), 0, move_threshold=1.0)
    records = grower.update(step=1, component_scores=scores)
    shrinks = [r for r in records if r["event"] == "shrink"]
    assert [(r["layer"], r["components"]) for r in shrinks] == [("2", [0])]  # the next lowest score
    assert layers["0"].rank >= 2 and layers["2"].rank == 1


def test_a_layer_that_gave_is_not_grown_again():
    grower, layers, _ = _grower(_logged(("0", "shrink")), 10_000)
    records = grower.update(step=1)
    assert {r["layer"] for r in records if r["event"] == "grow"} == {"2", "4"}
    assert layers["0"].rank == 2 and layers["2"].rank == layers["4"].rank == 3


def test_without_a_log_the_ways_come_from_the_growers_own_decisions():
    grower, layers, net = _grower(None, 0, move_threshold=1.0)
    first = grower.update(step=1, component_scores={"0": [0.0, 0.0], "2": [1e-3, 2e-3], "4": [1e-2, 2e-2]})
    (gave,) = [r["layer"] for r in first if r["event"] == "shrink"]
    (took,) = [r["layer"] for r in first if r["event"] == "grow"]
    _capture(grower, net, 6)
    # the layer that took now scores lowest, the one that gave would gain most: neither is used
    scores = {n: [0.0] * m.rank if n == took else [1e-3 * (k + 1) for k in range(m.rank)] for n, m in layers.items()}
    second = grower.update(step=2, component_scores=scores)
    assert not any(r["layer"] == took and r["event"] == "shrink" for r in second)
    assert not any(r["layer"] == gave and r["event"] == "grow" for r in second)
