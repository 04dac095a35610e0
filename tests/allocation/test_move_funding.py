"""A rank move is paid by one donor component or several (lorambo/allocation/move_plan.py).

Layers differ in price per rank; with one component per move, a cheap layer could never fund a
rank of a dearer one (on MiniLM at P*, the MLP layers that uniform leaves at rank 0 could never
receive). Each receiver takes the cheaper, in summed score, of the lowest-scored component that
pays alone and the lowest-scored components in order until they pay, pruned of what the rest can
do without."""

import pytest
import torch
from torch import nn

import lorambo
from lorambo.allocation.move_plan import plan_moves
from lorambo.allocation.online import OnlineGrowth

DT = torch.float64
COSTS = {"a1": 10, "a2": 10, "a3": 10, "m": 25, "m2": 25}


def _plan(scores, budget_left=0, gains=None, max_moves=1, spare=None):
    gains = gains or {"m": 1.0}
    room = dict.fromkeys(gains, 1)
    return plan_moves(gains, scores, COSTS, room, budget_left, 0.0, float("inf"), max_moves, spare)


def test_cheap_components_fund_a_dearer_rank_together():
    moves = _plan({"a1": [0.1], "a2": [0.2], "a3": [0.3]})
    assert moves == [("a1", 0, "m"), ("a2", 0, "m"), ("a3", 0, "m")]  # 30 parameters pay for 25


def test_the_budget_left_pays_part_of_the_rank():
    assert _plan({"a1": [0.1], "a2": [0.2], "a3": [0.3]}, budget_left=5) == [("a1", 0, "m"), ("a2", 0, "m")]


def test_too_little_to_pay_moves_nothing():
    assert _plan({"a1": [0.1], "a2": [0.2]}, budget_left=4) == []


def test_one_dear_component_wins_when_it_scores_less_than_the_cheap_ones_together():
    scores = {"a1": [0.4], "a2": [0.5], "a3": [0.6], "m2": [1.0]}
    assert _plan(scores) == [("m2", 0, "m")]
    scores["m2"] = [1.6]  # now the three cheap ones (1.5 together) cost less score
    assert _plan(scores) == [("a1", 0, "m"), ("a2", 0, "m"), ("a3", 0, "m")]


def test_a_component_the_others_can_do_without_is_left_in_place():
    # in score order a1 (10) then m2 (25) pay; m2 alone pays too, so a1 stays
    assert _plan({"a1": [0.1], "m2": [0.2]}) == [("m2", 0, "m")]


def test_a_component_whose_removal_lowers_the_loss_goes_anyway():
    assert _plan({"a1": [-0.1], "m2": [0.2]}) == [("a1", 0, "m"), ("m2", 0, "m")]


def test_max_moves_counts_the_ranks_received():
    scores = {"a1": [0.1, 0.2], "a2": [0.3, 0.4], "a3": [0.5, 0.6]}
    moves = _plan(scores, gains={"m": 2.0, "m2": 1.0}, max_moves=2)
    # m takes 30 parameters for 25; the 5 left and 20 more pay for m2
    assert moves == [("a1", 0, "m"), ("a1", 1, "m"), ("a2", 0, "m"), ("a2", 1, "m2"), ("a3", 0, "m2")]
    assert sum(COSTS[d] for d, _, _ in moves) - sum(COSTS[r] for r in ("m", "m2")) >= 0
    assert _plan(scores, gains={"m": 2.0, "m2": 1.0}, max_moves=1) == moves[:3]


def test_spare_keeps_a_layers_later_components():
    scores = {"a1": [0.1, 0.2], "a2": [0.3], "a3": [0.4]}
    assert _plan(scores, spare={"a1": 1, "a2": 1, "a3": 1}) == [("a1", 0, "m"), ("a2", 0, "m"), ("a3", 0, "m")]


def test_online_growth_moves_two_cheap_components_into_a_dear_layer():
    """Through OnlineGrowth.update: the dear layer grows by one rank, both cheap donors shrink,
    each change has its record, and the spend stays within the budget."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6, dtype=DT), nn.Tanh(), nn.Linear(6, 4, dtype=DT), nn.Tanh(),
                        nn.Linear(4, 12, dtype=DT))  # costs 10, 10, 16 per rank
    # only the dear layer has room to receive; the budget is spent, so components must pay
    layers = lorambo.lora_layers(lorambo.configure_model(net, 1, capacity={"0": 1, "2": 1, "4": 3}))
    for layer in layers.values():
        torch.nn.init.normal_(layer.lora_B, std=0.1)
    budget = 10 + 10 + 16
    grower = OnlineGrowth(layers, budget=budget, sketch_rank=1, power_iters=2, seed=1, move_threshold=float("inf"))
    x, y = torch.randn(16, 4, dtype=DT), torch.randn(16, 12, dtype=DT)
    with grower.capture:
        ((net(x) - y) ** 2).mean().backward()
    net.zero_grad()
    scores = {n: torch.tensor([s], dtype=DT) for n, s in (("0", 0.1), ("2", 0.2), ("4", 5.0))}
    records = grower.update(0, None, component_scores=scores)
    assert [(r["event"], r["layer"], r["old_rank"], r["new_rank"]) for r in records] == [
        ("shrink", "0", 1, 0), ("shrink", "2", 1, 0), ("grow", "4", 1, 2)]
    assert all(r["reason"] == "move" for r in records)
    assert {n: m.rank for n, m in layers.items()} == {"0": 0, "2": 0, "4": 2}
    assert grower.spent() == 32 <= budget
    assert records[-1]["spent"] == 32


@pytest.mark.parametrize("scores, expected", [
    # in score order x, y pay 20 of 25, z makes 40; y can go (30 left), then x cannot (20)
    ({"a1": [0.1], "a2": [0.2], "b20": [0.3]}, [("a1", 0, "m"), ("b20", 0, "m")]),
    # the rest pays exactly the price (10 + 15 = 25): y goes
    ({"a1": [0.1], "a2": [0.2], "b15": [0.3]}, [("a1", 0, "m"), ("b15", 0, "m")]),
    # a component that scores 0 goes when the others pay (12 + 14 = 26), though neither alone could
    ({"a1": [0.0], "b12": [0.1], "b14": [0.2]}, [("b12", 0, "m"), ("b14", 0, "m")]),
])
def test_the_run_keeps_only_what_it_needs_highest_score_dropped_first(scores, expected):
    costs = {**COSTS, "b12": 12, "b14": 14, "b15": 15, "b20": 20}
    moves = plan_moves({"m": 1.0}, scores, costs, {"m": 1}, 0, 0.0, float("inf"), 1)
    assert moves == expected
    assert sum(costs[d] for d, _, _ in moves) >= costs["m"]


def test_a_layer_missing_from_spare_gives_nothing():
    assert _plan({"a1": [0.1], "a2": [0.2], "a3": [0.3]}, spare={"a1": 1, "a2": 1}) == []
    assert _plan({"a1": [0.1], "a2": [0.2], "a3": [0.3], "m2": [0.9]}, spare={"a1": 1, "a2": 1, "m2": 1}) == [
        ("m2", 0, "m")]


class _Counted:
    """Donor candidates that count how many were read."""

    def __init__(self, items):
        self.items, self.read = items, 0

    def __iter__(self):
        for item in self.items:
            self.read += 1
            yield item


@pytest.mark.parametrize("items, price, dearest, expected, read", [
    # the first pays alone: nothing after it is read
    ([(0.1, 30, 0), (0.2, 30, 1), (0.3, 30, 2)], 25, 30, [0], 1),
    # no single can pay (price above the dearest): the run is paid at the second
    ([(0.1, 10, 0), (0.2, 10, 1), (0.3, 10, 2)], 15, 10, [0, 1], 2),
    # the run (0.1 + 0.2) is paid; a later single would need a score <= 0.3: read on to 0.4
    ([(0.1, 10, 0), (0.2, 10, 1), (0.3, 10, 2), (0.4, 30, 3), (0.5, 30, 4)], 15, 30, [0, 1], 4),
    # ... but stops at a score above the run's (0.4 > 0.3): no later single can beat the run
    ([(0.1, 10, 0), (0.2, 10, 1), (0.4, 10, 2), (0.5, 30, 3)], 15, 30, [0, 1], 3),
    # ... and a single scoring 0.3 beats the run on a tie
    ([(0.1, 10, 0), (0.2, 10, 1), (0.3, 30, 2), (0.4, 30, 3)], 15, 30, [2], 3),
])
def test_the_donors_are_read_only_as_far_as_the_funding_needs(items, price, dearest, expected, read):
    from lorambo.allocation.move_plan import _cheapest_funding

    candidates = _Counted(items)
    assert _cheapest_funding(iter(candidates), price, dearest) == expected
    assert candidates.read == read
