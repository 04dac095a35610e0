"""Each lorambo method of the experiment allocates P by its own rule from its own inputs: a method
that fell back to another rule (uniform, say) or read another method's sensitivities would still
spend P and pass every budget check, and the comparison would be wrong."""

import math
import random

import pytest

from lorambo.allocation import allocate
from lorambo.experiments.methods import RunContext, budget_of
from lorambo.experiments.registry import make_method
from lorambo.experiments.student import short

pytestmark = pytest.mark.slow

CLOSED_FORM = ("gradient", "hessian", "data", "frobenius", "probe_sqrt")


@pytest.fixture(scope="module")
def inputs(planted_task):
    """Fresh, very unequal sensitivities for every method, and probe gain curves, per layer."""
    rng = random.Random(5)
    sens = {m: {n: rng.uniform(0.0, 1.0) ** 4 for n in planted_task.names} for m in CLOSED_FORM}
    sens["probe"] = {n: sorted((rng.uniform(0.0, 1.0) ** 3 for _ in range(12)), reverse=True)
                     for n in planted_task.names}
    return sens


def _setup(task, cfg, method, sens, level=1.0, seed=0):
    ctx = RunContext(task, cfg, level, budget_of(level, task.dims), seed, [], [], sens)
    run = make_method(method, ctx)
    run.setup(task.fresh_student(seed))
    return run, ctx


@pytest.mark.parametrize("method", CLOSED_FORM)
def test_closed_form_methods_use_the_square_root_law_on_their_own_sensitivity(planted_task, tiny_cfg, inputs,
                                                                               method):
    run, ctx = _setup(planted_task, tiny_cfg, method, inputs)
    expected = allocate(planted_task.dims, {short(n): s for n, s in inputs[method].items()}, ctx.budget,
                        "closed_form")
    assert run.final_ranks() == expected
    assert expected != allocate(planted_task.dims, None, ctx.budget, "uniform")   # the check can tell


def test_probe_is_the_knapsack_over_its_gain_curves(planted_task, tiny_cfg, inputs):
    run, ctx = _setup(planted_task, tiny_cfg, "probe", inputs)
    expected = allocate(planted_task.dims, None, ctx.budget, "knapsack",
                        benefits={short(n): g for n, g in inputs["probe"].items()})
    assert run.final_ranks() == expected
    assert expected != allocate(planted_task.dims, None, ctx.budget, "uniform")


def test_oracle_on_a_task_without_planted_ranks_is_refused_by_name():
    from types import SimpleNamespace

    task = SimpleNamespace(name="sentiment", dims={"layer.0.output.dense": (4, 4)})   # no planted ranks
    ctx = RunContext(task, None, 1.0, 8, 0, [], [])
    with pytest.raises(ValueError, match="the oracle method needs a task with planted ranks"):
        make_method("oracle", ctx).setup(object())


@pytest.mark.parametrize("level", [1.0, 1.5 * 768 / 41472])
def test_online_starts_uniform_at_its_share_of_p_but_never_below_one_rank(planted_task, tiny_cfg, level):
    """``online_initial`` x P, or one rank of the cheapest layer when that share buys none."""
    run, ctx = _setup(planted_task, tiny_cfg, "online", {}, level=level)
    cheapest = min(ctx.costs.values())
    initial = max(int(tiny_cfg.online_initial * ctx.budget), cheapest)
    assert initial == (cheapest if level < 1 else ctx.budget // 2)         # both sides of the max are used
    assert run.final_ranks() == allocate(planted_task.dims, None, initial, "uniform")
    assert run.opt.total_budget == ctx.budget                                # grows towards P


@pytest.mark.parametrize("steps, rounds, prune, decisions", [
    (40, 2, 0.3, [10, 20]),           # every 40 // (2 rounds + 2) steps: 2 rounds, then 20 steps to fine-tune
    (5, 4, 0.001, [1, 2, 3, 4]),      # a run too short for that: a round every step; at least one pruned
])
def test_alora_prunes_its_share_of_the_uniform_start_in_rounds_that_leave_time_to_fine_tune(planted_task,
                                                                                          tiny_cfg, steps, rounds,
                                                                                          prune, decisions):
    cfg = tiny_cfg.replace(steps=steps, alora_rounds=rounds, alora_prune=prune)
    run, ctx = _setup(planted_task, cfg, "alora", {})
    start = run.final_ranks()
    assert start == allocate(planted_task.dims, None, ctx.budget, "uniform")
    config = run.opt.alora_config
    assert config.decision_steps() == decisions
    assert config.n_prune == math.ceil(prune * sum(start.values())) == (1 if prune < 0.01 else config.n_prune)
    assert run.opt.heldout_batches is ctx.heldout and run.opt.loss_fn == planted_task.loss


def test_online_decides_from_a_fifth_of_the_run_every_fifth_until_just_past_half(planted_task, tiny_cfg):
    cfg = tiny_cfg.replace(steps=40)
    run, _ = _setup(planted_task, cfg, "online", {})
    assert [s for s in range(cfg.steps + 1) if run.opt.is_decision_step(s)] == [8, 16]


def test_oracle_keeps_planted_ranks_of_one_at_their_own_cost():
    from lorambo.experiments.methods_lorambo import oracle_ranks

    dims = {"a": (3, 5), "b": (4, 4)}
    planted = {"a": 1, "b": 2}                                   # P* = 8 + 16
    assert oracle_ranks(planted, dims, 24) == planted
    assert oracle_ranks(planted, dims, 48) == {"a": 2, "b": 4}
    with pytest.raises(ValueError, match="oracle: budget P = 12 is 0.5 x the planted cost P"):
        oracle_ranks(planted, dims, 12)                         # rank 1 x 0.5 is no whole rank
    with pytest.raises(ValueError, match="oracle: budget P = 0 is 0 x"):
        oracle_ranks(planted, dims, 0)                          # whole, but no rank at all
    assert 58 / 14 * 7 != 29                                    # k = 58 / 14 rounds in binary
    assert oracle_ranks({"a": 7}, {"a": (1, 1)}, 58) == {"a": 29}


def test_the_run_seed_and_growth_factor_reach_the_optimizer(planted_task, tiny_cfg):
    """The pools' room to grow (growth_factor) and the seed of the growth's sketches are the run's."""
    cfg = tiny_cfg.replace(growth_factor=4.0)
    run, _ = _setup(planted_task, cfg, "online", {}, seed=3)
    assert (run.opt.growth_factor, run.opt.seed) == (4.0, 3)
