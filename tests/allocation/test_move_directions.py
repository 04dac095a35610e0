"""Rank moves go one way per layer (lorambo/allocation/move_directions.py): a layer that received a
rank by a move never gives one, and a layer that gave one is neither grown nor moved into again,
over a whole run and across a resume (the ways are read from the decision log)."""

import copy

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


WIDTH, INTERVAL, STEPS = 16, 5, 80


def _planted_run():
    """(teacher, student, allocator, its optimizer, AdaLoRA scores, inputs): a planted rank-4
    delta in the middle layer, every component scoring below ``move_threshold``, so without the
    rule each decision moved out the component the previous one had grown."""
    teacher, student = _mlp(WIDTH, 0), _mlp(WIDTH, 0)
    with torch.no_grad():
        teacher[2].weight += 0.5 * torch.randn(WIDTH, 4, dtype=DT) @ torch.randn(4, WIDTH, dtype=DT) / WIDTH ** 0.5
    alloc = _allocator(student)
    alloc.configure({"0": 2, "2": 2, "4": 2})
    gen = torch.Generator().manual_seed(1)
    inputs = [torch.randn(32, WIDTH, dtype=DT, generator=gen) for _ in range(STEPS)]
    return teacher, student, alloc, alloc.make_optimizer(lr=3e-3), AdaLoRAImportance(student), inputs


def _allocator(student):
    return LoRAMBoOptimizer(student, total_budget=3 * 2 * 2 * WIDTH, sensitivity_method="frobenius", capacity=8,
                            interval=INTERVAL, warmup_steps=INTERVAL, sketch_rank=4, move_threshold=1e-3)


def _train(teacher, student, alloc, opt, importance, inputs, steps):
    for step in steps:
        with alloc.capture(step):
            ((student(inputs[step]) - teacher(inputs[step]).detach()) ** 2).mean().backward()
        importance.update()
        importance.follow(alloc.step(step, opt, component_scores=importance.component_scores()))
        opt.step()
        opt.zero_grad()


def _check_one_way(records):
    for layer in ("0", "2", "4"):
        way = _way(records, layer)
        assert way in ([], ["grow"] * len(way), ["shrink"] * len(way)), (layer, way)


def test_no_move_reverses_an_earlier_one_over_a_run():
    teacher, student, alloc, opt, importance, inputs = _planted_run()
    _train(teacher, student, alloc, opt, importance, inputs, range(STEPS))
    moves = [r for r in alloc.decisions if r["reason"] == "move"]
    assert len(moves) >= 4  # at least two moves, each a shrink and a grow
    _check_one_way(alloc.decisions)
    # every move takes a rank from a layer that only gives: at most the ranks those layers held
    gave = {r["layer"] for r in moves if r["event"] == "shrink"}
    assert sum(r["event"] == "shrink" for r in moves) <= 2 * len(gave)
    assert sum(m.rank for m in lorambo.lora_layers(student).values()) == 6


def test_the_ways_survive_a_resume():
    """Saved after the first move, a fresh allocator loaded with the state decides as the
    uninterrupted run: the ways come back with the decisions."""
    teacher, student, alloc, opt, importance, inputs = _planted_run()
    first_move = None
    for step in range(STEPS):
        _train(teacher, student, alloc, opt, importance, inputs, [step])
        if any(r["reason"] == "move" for r in alloc.decisions):
            first_move = step
            break
    assert first_move is not None and first_move + 4 * INTERVAL < STEPS
    # deep copies, as torch.save and torch.load would make: a loaded state_dict shares its tensors
    saved = copy.deepcopy((student, alloc.state_dict(), importance.state_dict()))
    _train(teacher, student, alloc, opt, importance, inputs, range(first_move + 1, STEPS))

    model, state, scores_state = saved
    resumed = _allocator(model)
    resumed_opt = resumed.make_optimizer(lr=3e-3)
    resumed.load_state_dict(state)
    resumed_importance = AdaLoRAImportance(model)
    resumed_importance.load_state_dict(scores_state)
    _train(teacher, model, resumed, resumed_opt, resumed_importance, inputs, range(first_move + 1, STEPS))
    later = [r for r in alloc.decisions if r["step"] > first_move]
    assert any(r["reason"] == "move" for r in later)  # moves after the save, decided from the ways
    assert resumed.decisions == alloc.decisions
    _check_one_way(resumed.decisions)


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
