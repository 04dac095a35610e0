"""Edge cases of online growth's plan that the broader tests never reached (found by mutation
testing of lorambo/allocation/online.py): a layer with room for exactly one rank, a gain that is
not finite, a budget that is already overspent, a gain equal to the threshold, the default
threshold; plan_moves' defaults and limits; OnlineGrowth.update refusing bad arguments (an
optimizer, a GradScaler or its scale, component scores) before any change, and not reading a
disabled GradScaler."""

import math
import types

import pytest
import torch
from torch import nn

import lorambo
from lorambo.allocation.online import OnlineGrowth, plan_growth, plan_moves

DT = torch.float64


def test_a_layer_with_room_for_one_rank_gets_it():
    # room 1 is the last rank below a layer's capacity (or max_rank): it must still be offered
    plan = plan_growth({"a": [3.0, 2.0], "b": [5.0]}, {"a": 10, "b": 10}, {"a": 1, "b": 1}, 100, 0.0)
    assert plan == {"a": 1, "b": 1}
    # a layer the room does not name has none (a full pool, a frozen adapter)
    assert plan_growth({"a": [3.0], "b": [5.0]}, {"a": 10, "b": 10}, {"a": 1}, 100, 0.0) == {"a": 1}


def test_an_overspent_budget_grows_nothing_and_does_not_raise():
    # budget - spent < 0 (layers configured above the budget): no growth, not greedy's ValueError
    assert plan_growth({"a": [3.0]}, {"a": 10}, {"a": 2}, -5, 0.0) == {}
    assert plan_growth({"a": [3.0]}, {"a": 10}, {"a": 2}, 0, 0.0) == {}


def test_the_budget_is_spent_to_the_last_parameter():
    # a leftover of exactly one layer's cost buys that rank (cost 1: the smallest the plan accepts)
    assert plan_growth({"a": [3.0, 1.0]}, {"a": 1}, {"a": 2}, 1, 0.0) == {"a": 1}


def test_only_gains_above_the_threshold_are_taken():
    # "a rank is added only if its marginal benefit exceeds the threshold": equal is not enough
    plan = plan_growth({"a": [2.0, 0.5], "b": [0.5]}, {"a": 4, "b": 4}, {"a": 2, "b": 1}, 100, 0.5)
    assert plan == {"a": 1}


def test_the_default_threshold_takes_every_positive_gain():
    plan = plan_growth({"a": [0.5, 0.25], "b": [0.0]}, {"a": 4, "b": 4}, {"a": 2, "b": 1}, 100)
    assert plan == {"a": 2}


def test_a_gain_that_is_not_finite_buys_no_rank():
    # an overflowed estimate (inf) or a nan is no evidence of benefit: the budget goes to the
    # finite gains only, here both ranks of b (the budget of 100 could buy all six ranks)
    plan = plan_growth({"a": [math.inf, math.inf], "b": [2.0, 1.0], "c": [math.nan, 3.0]},
                       {"a": 10, "b": 10, "c": 10}, {"a": 2, "b": 2, "c": 2}, 100, 0.0)
    assert plan == {"b": 2}


def test_plan_moves_makes_one_move_by_default():
    # two receivers above the threshold and two donors below the move threshold, the budget spent:
    # without max_moves, one move: the best receiver by gain / cost ("a": 6/10 against "b": 4/10)
    # funded by the lowest score (component 1 of "d", -0.2)
    moves = plan_moves({"a": 6.0, "b": 4.0}, {"c": [0.05], "d": [0.3, -0.2]}, {n: 10 for n in "abcd"},
                       {"a": 1, "b": 1}, 0, threshold=0.5, move_threshold=0.5)
    assert moves == [("d", 1, "a")]


def test_plan_moves_receivers_need_a_gain_above_the_threshold_and_room():
    costs = {n: 10 for n in "abc"}
    donor = {"c": [-1.0]}
    # "a" gains exactly the threshold: not more, so no move funds it
    assert plan_moves({"a": 0.5}, donor, costs, {"a": 1}, 0, threshold=0.5, move_threshold=0.0) == []
    # "b" is not in room (its pool is full): it receives nothing; "a" with room does
    moves = plan_moves({"a": 1.0, "b": 2.0}, donor, costs, {"a": 1}, 0, threshold=0.5, move_threshold=0.0)
    assert moves == [("c", 0, "a")]


def test_plan_moves_spare_limits_the_donors():
    # a layer that spare does not name (or names with 0) gives nothing: at min_rank already
    costs = {n: 10 for n in "ac"}
    args = ({"a": 1.0}, {"c": [-1.0]}, costs, {"a": 1}, 0)
    assert plan_moves(*args, threshold=0.5, move_threshold=0.0, spare={}) == []
    assert plan_moves(*args, threshold=0.5, move_threshold=0.0, spare={"c": 0}) == []
    assert plan_moves(*args, threshold=0.5, move_threshold=0.0, spare={"c": 1}) == [("c", 0, "a")]


def _captured_grower(**kwargs):
    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(6, 8, dtype=DT), nn.Tanh(), nn.Linear(8, 3, dtype=DT))
    layers = lorambo.lora_layers(lorambo.configure_model(net, {"0": 1, "2": 1}, capacity=3))
    grower = OnlineGrowth(layers, 10_000, **kwargs)
    with grower.capture:
        ((net(torch.randn(8, 6, dtype=DT)) - torch.randn(8, 3, dtype=DT)) ** 2).mean().backward()
    return grower, layers


@pytest.mark.parametrize("bad", ["no scores", "not an optimizer"])
def test_update_refuses_bad_arguments_before_any_change(bad):
    grower, layers = _captured_grower(move_threshold=0.5 if bad == "no scores" else None)
    if bad == "no scores":
        with pytest.raises(ValueError, match=r"rank moves \(move_threshold set\) need component_scores"):
            grower.update(step=0)
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD([nn.Parameter(torch.ones(1))]), lambda s: 1)
        with pytest.raises(TypeError, match="update_ranks: optimizer must be a torch optimizer"):
            grower.update(step=0, optimizer=scheduler)
    assert {n: m.rank for n, m in layers.items()} == {"0": 1, "2": 1}
    assert grower.capture.has_data()  # the captured step is kept for a retry


class _Scaler:
    """A duck-typed GradScaler (``get_scale`` and ``is_enabled`` are all update reads)."""

    def __init__(self, scale, enabled=True):
        self.scale, self.enabled = scale, enabled

    def get_scale(self):
        return self.scale

    def is_enabled(self):
        return self.enabled


@pytest.mark.parametrize("scaler, error, match", [
    (2.0, TypeError, r"update_ranks: grad_scaler=2.0 must be a torch.amp.GradScaler or None"),
    # half a GradScaler: update would fail on the missing method with an AttributeError
    (types.SimpleNamespace(get_scale=lambda: 2.0), TypeError, r"grad_scaler=namespace\(get_scale=.* must be"),
    (types.SimpleNamespace(is_enabled=lambda: True), TypeError, r"grad_scaler=namespace\(is_enabled=.* must be"),
    # a scale that is not > 0 and finite would divide every gain into 0, inf or NaN
    (_Scaler(0.0), ValueError, r"grad_scaler's scale is 0.0: must be finite and > 0"),
    (_Scaler(-8.0), ValueError, r"grad_scaler's scale is -8.0: must be finite and > 0"),
    (_Scaler(math.inf), ValueError, r"grad_scaler's scale is inf: must be finite and > 0"),
    (_Scaler(math.nan), ValueError, r"grad_scaler's scale is nan: must be finite and > 0")])
def test_update_refuses_a_bad_grad_scaler_before_any_change(scaler, error, match):
    grower, layers = _captured_grower()
    with pytest.raises(error, match=match):
        grower.update(step=0, grad_scaler=scaler)
    assert {n: m.rank for n, m in layers.items()} == {"0": 1, "2": 1}
    assert grower.capture.has_data()


def test_a_disabled_grad_scaler_is_not_read():
    # disabled: the loss was not scaled, whatever get_scale says (0 here, refused were it read)
    want = _captured_grower()[0].update(step=0)
    got = _captured_grower()[0].update(step=0, grad_scaler=_Scaler(0.0, enabled=False))
    assert want and [(r["layer"], r["new_rank"]) for r in got] == [(r["layer"], r["new_rank"]) for r in want]
    assert [r["gains"] for r in got] == [r["gains"] for r in want]


@pytest.mark.parametrize("scores, match", [
    # a misspelt layer name would otherwise drop its scores without a word
    ({"0": [0.1], "9": [0.2]}, r"component_scores for unknown layers \['9'\]"),
    ({"0": [0.1, 0.2]}, r"component_scores\['0'\] must be 1 finite numbers \(its rank\)"),     # rank is 1
    ({"0": [[0.1]]}, r"component_scores\['0'\] must be 1 finite numbers"),
    ({"0": [0.1], "2": [math.nan]}, r"component_scores\['2'\] must be 1 finite numbers"),
    ({"0": [-math.inf]}, r"component_scores\['0'\] must be 1 finite numbers")])
def test_update_refuses_bad_component_scores_before_any_change(scores, match):
    grower, layers = _captured_grower(move_threshold=0.5)
    with pytest.raises(ValueError, match=match):
        grower.update(step=0, component_scores=scores)
    assert {n: m.rank for n, m in layers.items()} == {"0": 1, "2": 1}
    assert grower.capture.has_data()


def test_moves_with_no_layer_scored_grow_as_without_moves():
    # scores for no layer: nothing can give a rank, and the growth is that of a grower without moves
    want = _captured_grower()[0].update(step=0)
    got = _captured_grower(move_threshold=0.5)[0].update(step=0, component_scores={})
    assert want and [(r["event"], r["layer"], r["new_rank"]) for r in got] == \
        [(r["event"], r["layer"], r["new_rank"]) for r in want]


def test_a_grow_record_lists_the_gain_of_each_rank_it_added():
    # one layer, three estimated gains, a budget for two of its ranks (cost 6 + 8 = 14 each):
    # the record holds the first two gains, and its benefit is the first (the largest)
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(6, 8, dtype=DT), nn.Tanh(), nn.Linear(8, 3, dtype=DT))
    layers = lorambo.lora_layers(lorambo.configure_model(net, {"0": 1}, capacity=6))
    grower = OnlineGrowth(layers, 14 * (1 + 2), sketch_rank=3)
    with grower.capture:
        ((net(torch.randn(12, 6, dtype=DT)) - torch.randn(12, 3, dtype=DT)) ** 2).mean().backward()
    (record,) = grower.update(step=0)
    assert (record["old_rank"], record["new_rank"]) == (1, 3)
    assert len(record["gains"]) == 2 and record["benefit"] == record["gains"][0] > record["gains"][1] > 0


def test_a_layer_grown_by_the_plan_gives_nothing_in_the_same_decision():
    # the budget left (27 = 14 + 13) grows both layers by one rank; both score below the move
    # threshold, but a rank just bought is not sold again at once: no moves
    torch.manual_seed(4)
    net = nn.Sequential(nn.Linear(6, 8, dtype=DT), nn.Tanh(), nn.Linear(8, 5, dtype=DT))
    layers = lorambo.lora_layers(lorambo.configure_model(net, {"0": 2, "2": 2}, capacity=4))
    grower = OnlineGrowth(layers, 2 * 14 + 2 * 13 + 27, sketch_rank=2, move_threshold=0.0)
    with grower.capture:
        ((net(torch.randn(12, 6, dtype=DT)) - torch.randn(12, 5, dtype=DT)) ** 2).mean().backward()
    records = grower.update(step=0, component_scores={"0": [-1.0, -0.5], "2": [-1.0, -0.5]})
    assert [(r["event"], r["reason"], r["layer"]) for r in records] == [("grow", "grow", "0"), ("grow", "grow", "2")]
    assert {n: m.rank for n, m in layers.items()} == {"0": 3, "2": 3}
