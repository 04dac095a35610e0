"""The ``moves`` methods of the experiment: uniform at P, then rank moves at its decision steps,
MOVES_PER_DECISION ranks at a time, one way per layer, within P; ``moves`` scores components by
AdaLoRA importance, ``moves_ablation`` by the held-out loss each one's removal costs."""

import pytest

from lorambo.experiments.methods import RunContext, budget_of
from lorambo.experiments.methods_lorambo import MOVES_PER_DECISION
from lorambo.experiments.registry import make_method
from lorambo.experiments.student import short

pytestmark = pytest.mark.slow


def _ctx(task, cfg, level=1.0, heldout=()):
    return RunContext(task, cfg, level, budget_of(level, task.dims), 0, [], list(heldout), {})


def test_moves_decides_from_a_fifth_of_the_run_every_tenth_until_just_past_half(planted_task, tiny_cfg):
    cfg = tiny_cfg.replace(steps=40)
    run = make_method("moves", _ctx(planted_task, cfg))
    run.setup(planted_task.fresh_student(0))
    assert [s for s in range(cfg.steps + 1) if run.opt.is_decision_step(s)] == [8, 12, 16, 20]
    assert run.opt.max_moves == MOVES_PER_DECISION and run.opt.move_threshold == float("inf")
    # the whole of P from the start: what is left is less than one rank of the cheapest layer
    ranks = {short(n): r for n, r in run.opt.current_ranks().items()}
    costs = {n: sum(d) for n, d in planted_task.dims.items()}
    left = run.ctx.budget - sum(ranks[n] * costs[n] for n in ranks)
    assert 0 <= left < min(costs.values())


@pytest.mark.parametrize("name", ["moves", "moves_ablation"])
def test_a_moves_run_moves_ranks_one_way_within_p(planted_task, tiny_cfg, name):
    """The experiment's loop (as train_run runs it), with the decisions looked at: ranks move, at
    most MOVES_PER_DECISION received per decision, no layer both gives and receives, and P holds."""
    from lorambo.optim import AdamW

    cfg = tiny_cfg.replace(steps=25)
    ctx = _ctx(planted_task, cfg, heldout=planted_task.heldout_batches(4))
    method = make_method(name, ctx)
    model = method.setup(planted_task.fresh_student(0))
    model.eval()
    optimizer = AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    for step, batch in enumerate(planted_task.train_batches(0, cfg.steps, cfg.batch_size)):
        with method.capture(step, batch):
            planted_task.loss(model, batch).backward()
        method.after_backward(step, optimizer)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    moves = [r for r in method.opt.decisions if r["reason"] == "move"]
    shrinks = [r for r in moves if r["event"] == "shrink"]
    assert shrinks, "no rank moved"
    for step in {r["step"] for r in shrinks}:
        assert sum(r["event"] == "grow" and r["step"] == step for r in moves) <= MOVES_PER_DECISION
    gave = {r["layer"] for r in shrinks}
    received = {r["layer"] for r in moves if r["event"] == "grow"}
    assert gave and received and not gave & received
    # a layer that gave is never grown after (growth of left-over budget before it gave sets no way)
    records = method.opt.decisions
    first_gift = {}
    for i, r in enumerate(records):
        if r["event"] == "shrink" and r["reason"] == "move":
            first_gift.setdefault(r["layer"], i)
    assert not any(r["event"] == "grow" and i > first_gift.get(r["layer"], len(records))
                   for i, r in enumerate(records))
    ranks = {short(n): r for n, r in method.opt.current_ranks().items()}
    assert set(ranks) == set(planted_task.dims)
    assert sum(ranks[n] * sum(planted_task.dims[n]) for n in ranks) <= ctx.budget


def test_moves_ablation_scores_on_the_validation_batches_with_the_task_loss(planted_task, tiny_cfg):
    heldout = planted_task.heldout_batches(4)
    run = make_method("moves_ablation", _ctx(planted_task, tiny_cfg.replace(steps=40), heldout=heldout))
    run.setup(planted_task.fresh_student(0))
    assert run.opt.heldout_batches == heldout and run.opt.loss_fn == planted_task.loss
    assert run.importance is None  # no AdaLoRA statistics kept: the allocator scores by itself
    assert run.opt.max_moves == MOVES_PER_DECISION and run.opt.move_threshold == float("inf")
