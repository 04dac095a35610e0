"""The decision schedule and the capture around it, without LoRAMBoOptimizer."""

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import lorambo
from lorambo.allocation.online import OnlineGrowth
from lorambo.allocation.schedule import DecisionSchedule, ScheduledGrowth

DT = torch.float64

pytestmark = pytest.mark.usefixtures("one_thread")


def test_decision_steps_follow_warmup_interval_and_stop():
    assert [s for s in range(20) if DecisionSchedule(2, 3, 12).is_decision_step(s)] == [2, 5, 8, 11]
    assert [s for s in range(5) if DecisionSchedule(0, 1).is_decision_step(s)] == [0, 1, 2, 3, 4]
    assert [s for s in range(12) if DecisionSchedule(interval=5).is_decision_step(s)] == [0, 5, 10]  # no warmup
    # stop_step is excluded even where it falls on the grid; stop_step=0 (a valid bound) decides never
    assert [s for s in range(8) if DecisionSchedule(0, 2, 4).is_decision_step(s)] == [0, 2]
    assert not any(DecisionSchedule(0, 1, 0).is_decision_step(s) for s in range(5))
    assert not any(DecisionSchedule(0, None).is_decision_step(s) for s in range(50))
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match=f"interval={bad!r} must be an int >= 1 or None"):
            DecisionSchedule(0, bad)



@pytest.mark.parametrize("kwargs, message", [
    (dict(warmup_steps=2.7), r"warmup_steps=2.7 must be an int >= 0"),      # ran as 2
    (dict(warmup_steps="3"), r"warmup_steps='3' must be an int >= 0"),      # ran as 3
    (dict(warmup_steps=-5), r"warmup_steps=-5 must be an int >= 0"),        # decided at 5, 15, ...
    (dict(warmup_steps=-1), r"warmup_steps=-1 must be an int >= 0"),
    (dict(warmup_steps=True), r"warmup_steps=True must be an int >= 0"),
    (dict(stop_step=3.5), r"stop_step=3.5 must be an int >= 0 or None"),
    (dict(stop_step=-1), r"stop_step=-1 must be an int >= 0 or None"),
])
def test_bad_warmup_and_stop_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DecisionSchedule(**{"warmup_steps": 0, "interval": 10, **kwargs})
    with pytest.raises(ValueError, match=message):
        lorambo.LoRAMBoOptimizer(_model(), total_budget=100, interval=10, **kwargs)
    assert DecisionSchedule(np.int64(3), 10, np.int64(24)).is_decision_step(13)  # numpy ints are ints


def _model():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 10, dtype=DT), nn.Tanh(), nn.Linear(10, 3, dtype=DT))
    return lorambo.configure_model(net, 1, capacity={"0": 4, "2": 3})


def _backward(model, seed):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(16, 6, generator=g, dtype=DT), torch.randn(16, 3, generator=g, dtype=DT)
    ((model(x) - y) ** 2).mean().backward()


def test_hooks_and_rank_changes_only_on_decision_steps():
    model = _model()
    layers = lorambo.lora_layers(model)
    built = []

    def build():
        built.append(1)
        return OnlineGrowth(layers, budget=10_000, sketch_rank=1)

    growth = ScheduledGrowth(DecisionSchedule(warmup_steps=1, interval=2), build)
    changed = []
    for step in range(6):
        before = [m.rank for m in layers.values()]
        with growth.capture(step):
            assert all(bool(m._forward_hooks) == (step % 2 == 1) for m in layers.values())
            _backward(model, step)
        assert not any(m._forward_hooks for m in layers.values())
        records = growth.step(step)
        assert bool(built) == (step >= 1)  # built at the first decision step, not before
        if [m.rank for m in layers.values()] != before:
            changed.append(step)
        assert bool(records) == (step in changed)
        if built:  # every step starts from nothing captured
            assert not growth.growth.capture.has_data()
    assert changed == [1, 3, 5] and len(built) == 1


def test_a_decision_step_without_capture_warns_and_changes_nothing():
    model = _model()
    growth = ScheduledGrowth(DecisionSchedule(0, 1), lambda: OnlineGrowth(lorambo.lora_layers(model), 10_000))
    _backward(model, 0)  # outside capture(): no activations recorded
    with pytest.warns(RuntimeWarning, match="step 0 is a rank decision step but no activations"):
        assert growth.step(0) == []
    assert all(m.rank == 1 for m in lorambo.lora_layers(model).values())


def test_rank_moves_take_scores_from_the_caller_or_the_scorer():
    model = _model()
    layers = lorambo.lora_layers(model)

    def build():
        return OnlineGrowth(layers, budget=10_000, move_threshold=0.5)

    growth = ScheduledGrowth(DecisionSchedule(0, 1), build)
    with growth.capture(0):
        _backward(model, 0)
    with pytest.raises(ValueError, match="rank moves need component_scores"):
        growth.step(0)
    asked = []

    def scorer():
        asked.append(1)
        return {n: torch.ones(m.rank) for n, m in layers.items()}

    growth = ScheduledGrowth(DecisionSchedule(0, 1), build, score_components=scorer)
    with growth.capture(1):
        _backward(model, 1)
    assert growth.step(1) and asked == [1]
    with growth.capture(2):
        _backward(model, 2)
    growth.step(2, component_scores={n: torch.ones(m.rank) for n, m in layers.items()})
    assert asked == [1]  # given scores are used as they are


def _restarted_decision(interrupt: bool) -> list[dict]:
    """Step 0's decision, after (``interrupt``) a run that stopped between step 3's capture and
    its step(), or on a fresh model."""
    model = _model()
    layers = lorambo.lora_layers(model)
    growth = ScheduledGrowth(DecisionSchedule(0, 3), lambda: OnlineGrowth(layers, budget=10_000, sketch_rank=2))
    if interrupt:
        with growth.capture(3):
            _backward(model, 3)
        model.zero_grad()  # the loop stops here (an error, Ctrl-C) and starts again at step 0
    with growth.capture(0):
        _backward(model, 0)
    return growth.step(0)


def test_a_restarted_loop_decides_from_its_own_step_only():
    """A decision used every activation the capture held: those of a step whose run stopped
    before its step() went into the next decision too (gains differing from a fresh run's)."""
    fresh = _restarted_decision(interrupt=False)
    assert fresh and _restarted_decision(interrupt=True) == fresh


def test_loading_an_allocator_state_drops_activations_captured_before():
    model = _model()
    opt = lorambo.LoRAMBoOptimizer(model, total_budget=10_000, warmup_steps=0, interval=3, sketch_rank=2)
    state = opt.state_dict()
    with opt.capture(3):
        _backward(model, 3)
    assert opt.online.capture.has_data()
    opt.load_state_dict(state)  # resuming: the captured step belongs to the run that stopped
    assert not opt.online.capture.has_data()
    opt.state_dict()  # refused while a capture is held


class _Interrupted(Exception):
    pass


@pytest.mark.parametrize("through_allocator", [False, True])
def test_a_capture_block_that_raises_leaves_nothing_for_its_decision(through_allocator):
    """A backward stopped partway (out of memory, say) had reached only the last layer: the
    decision grew that layer alone from the partial capture, and the first layer's X stayed held."""
    model = _model()
    layers = lorambo.lora_layers(model)
    if through_allocator:
        opt = lorambo.LoRAMBoOptimizer(model, total_budget=10_000, warmup_steps=0, interval=1, sketch_rank=1)
        capture, decide, growth = opt.capture, opt.step, lambda: opt.online
    else:
        schedule = ScheduledGrowth(DecisionSchedule(0, 1), lambda: OnlineGrowth(layers, budget=10_000, sketch_rank=1))
        capture, decide, growth = schedule.capture, schedule.step, lambda: schedule.growth

    def stop(grad):
        raise _Interrupted

    hook = model[2].register_forward_pre_hook(lambda module, args: args[0].register_hook(stop) and None)
    with pytest.raises(_Interrupted):
        with capture(0):
            _backward(model, 0)  # dY reaches layer "2", then the backward stops before layer "0"
    hook.remove()
    assert not growth().capture.has_data() and not any(growth().capture.inputs.values())
    with pytest.warns(RuntimeWarning, match="step 0 is a rank decision step but no activations"):
        assert decide(0) == []
    assert [m.rank for m in layers.values()] == [1, 1]


def _begin_step_decision(failed_attempt: bool) -> list[dict]:
    """Step 0's decision through ``begin_step``, after (``failed_attempt``) an attempt whose
    backward stopped partway and that the loop dropped with ``close()`` before retrying."""
    model = _model()
    opt = lorambo.LoRAMBoOptimizer(model, total_budget=10_000, warmup_steps=0, interval=1, sketch_rank=1)
    if failed_attempt:
        hook = model[2].register_forward_pre_hook(
            lambda module, args: args[0].register_hook(lambda grad: (_ for _ in ()).throw(_Interrupted())) and None)
        opt.begin_step(0)
        with pytest.raises(_Interrupted):
            _backward(model, 1)  # another batch; its dY reaches layer "2" only
        hook.remove()
        model.zero_grad()
        opt.close()  # what docs/allocation.md asks of a loop that retries a step begun with begin_step
        assert not opt.online.capture.has_data()
    opt.begin_step(0)
    _backward(model, 0)
    return opt.step(0)


def test_close_drops_a_failed_begin_step_attempt_before_its_retry():
    """begin_step calls with one step number accumulate (micro-batches): a retried attempt is
    told apart only by close(), after which the decision is the one of the retry alone."""
    fresh = _begin_step_decision(failed_attempt=False)
    assert fresh and _begin_step_decision(failed_attempt=True) == fresh


def test_close_and_rebuild_before_any_decision_build_nothing():
    def build():
        raise AssertionError("close() / rebuild() built the OnlineGrowth")

    growth = ScheduledGrowth(DecisionSchedule(5, 1), build)
    growth.close()
    growth.rebuild()
    assert growth.built is None


def _micro_batch_decision(parts: int) -> tuple[list[int], list[float]]:
    """Step 0's decision from one batch of 16 rows split into ``parts`` micro-batches, each begun
    with begin_step(0); a summed loss gives every row the same dY however the batch is split."""
    model = _model()
    layers = lorambo.lora_layers(model)
    growth = ScheduledGrowth(DecisionSchedule(0, 5), lambda: OnlineGrowth(layers, budget=10_000, sketch_rank=2))
    g = torch.Generator().manual_seed(11)
    x, y = torch.randn(16, 6, generator=g, dtype=DT), torch.randn(16, 3, generator=g, dtype=DT)
    for xs, ys in zip(x.chunk(parts), y.chunk(parts)):
        growth.begin_step(0)
        ((model(xs) - ys) ** 2).sum().backward()
    records = growth.step(0)
    return [m.rank for m in layers.values()], [g for r in records for g in r["gains"]]


def test_micro_batches_of_one_step_add_up_to_the_whole_batch():
    """A second begin_step with the same step number keeps what the first captured: dropping it
    decided from the last micro-batch alone."""
    ranks, gains = _micro_batch_decision(1)
    split_ranks, split_gains = _micro_batch_decision(2)
    assert ranks != [1, 1] and split_ranks == ranks
    assert split_gains == pytest.approx(gains, rel=1e-12)  # float64 sums in another order


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
