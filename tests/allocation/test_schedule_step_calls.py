"""ScheduledGrowth.step off and on the schedule: a step that is no decision step decides nothing,
warns nothing and frees activations a decision step left behind; a loop that never captures is
warned once, not at every decision step (gaps found by mutation testing)."""
import warnings

import pytest
import torch
from torch import nn

import lorambo
from lorambo.allocation.online import OnlineGrowth
from lorambo.allocation.schedule import DecisionSchedule, ScheduledGrowth

DT = torch.float64

pytestmark = pytest.mark.usefixtures("one_thread")


def _model():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 10, dtype=DT), nn.Tanh(), nn.Linear(10, 3, dtype=DT))
    return lorambo.configure_model(net, 1, capacity={"0": 4, "2": 3})


def _backward(model, seed):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(16, 6, generator=g, dtype=DT), torch.randn(16, 3, generator=g, dtype=DT)
    ((model(x) - y) ** 2).mean().backward()


def test_a_step_off_the_schedule_ignores_what_a_skipped_decision_step_captured():
    model = _model()
    layers = lorambo.lora_layers(model)
    growth = ScheduledGrowth(DecisionSchedule(1, 2), lambda: OnlineGrowth(layers, budget=10_000, sketch_rank=1))
    with growth.capture(1):  # a decision step whose step(1) the loop never called
        _backward(model, 1)
    assert growth.growth.capture.has_data()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is wrong at a step that decides nothing
        assert growth.step(2) == []
    assert [m.rank for m in layers.values()] == [1, 1]
    assert not growth.growth.capture.has_data()  # step 1's X and dY are not held until step 3


def test_a_loop_that_never_captures_is_warned_at_the_first_decision_step_only():
    model = _model()
    growth = ScheduledGrowth(DecisionSchedule(0, 1), lambda: OnlineGrowth(lorambo.lora_layers(model), 10_000))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(4):
            _backward(model, step)  # outside capture(): nothing recorded
            assert growth.step(step) == []
    assert [str(w.message)[:40] for w in caught] == ["step 0 is a rank decision step but no ac"]
