"""Every method trains the same kind of parameters: its LoRA factors, nothing else."""

import pytest

from lorambo.experiments.config import METHODS, REFERENCE
from lorambo.experiments.methods import RunContext, budget_of, compute_sensitivities
from lorambo.experiments.registry import make_method

pytestmark = pytest.mark.slow

ALLOCATORS = tuple(m for m in METHODS if m not in REFERENCE)  # the oracle needs the planted task


def test_sentiment_head_stays_frozen_for_every_method(sentiment_task, tiny_cfg):
    """The classification head is the linear probe's for every method: a method that also trained
    it (770 parameters) would get more than the budget P and a different model than the others."""
    cfg = tiny_cfg
    batches = sentiment_task.train_batches(0, cfg.steps, cfg.batch_size)
    calib = batches[:cfg.calib_batches]
    sens, _ = compute_sensitivities(sentiment_task, cfg, 0, calib, ALLOCATORS, stream=batches)
    level = 1.0
    ctx = RunContext(sentiment_task, cfg, level, budget_of(level, sentiment_task.dims), 0, calib,
                     sentiment_task.heldout_batches(cfg.alora_heldout), sens)
    head_numel = sum(p.numel() for p in sentiment_task.head.parameters())
    assert head_numel == 384 * 2 + 2
    for method in ALLOCATORS:
        model = make_method(method, ctx).setup(sentiment_task.fresh_student(0))
        names = {n for n, _ in model.named_parameters()}
        assert any(n.endswith("head.weight") for n in names), method
        trained = [n for n, p in model.named_parameters() if p.requires_grad]
        assert trained, method
        assert [n for n in trained if ".lora_" not in n] == [], method


def test_a_run_is_plain_adamw_over_the_given_batches_in_eval_mode(planted_task, tiny_cfg):
    """``train_run`` against a loop written out here with torch's own AdamW (no weight decay) in
    float64: the same losses step by step and the same test score, so every method gets exactly
    ``steps`` updates at the given rate on the seed's stream, with dropout off."""
    import torch

    from lorambo.experiments.train import train_run

    cfg = tiny_cfg.replace(val_every=0)
    task, lr, seed = planted_task, 3e-3, 0
    batches = task.train_batches(seed, cfg.steps, cfg.batch_size)
    ctx = RunContext(task, cfg, 1.0, budget_of(1.0, task.dims), seed, batches[:1], task.heldout_batches(4), {})
    run = train_run(ctx, "uniform", lr, batches)

    model = make_method("uniform", ctx).setup(task.fresh_student(seed)).double()
    model.train(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses = []
    for batch in batches:
        batch = {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}
        loss = task.loss(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert run["train_loss"] == pytest.approx(losses, rel=1e-4)
    assert len(run["train_loss"]) == cfg.steps and run["val_curve"] == []
    test = task.evaluate(model.float(), "test")[task.metric]  # after the last update too
    assert run["metric"] == run["test"][task.metric] == pytest.approx(test, rel=1e-4)


@pytest.mark.parametrize("method", ["online", "alora"])
def test_the_adaptive_methods_change_their_ranks_during_the_run(planted_task, tiny_cfg, method):
    """Online growth and ALoRA allocate while training (``Method.after_backward`` drives their
    ``LoRAMBoOptimizer.step``): a loop that skipped it would train their starting ranks, uniform
    LoRA at a smaller budget, and still pass every budget check."""
    from lorambo.experiments.train import train_run

    task = planted_task
    batches = task.train_batches(0, tiny_cfg.steps, tiny_cfg.batch_size)
    ctx = RunContext(task, tiny_cfg, 1.0, budget_of(1.0, task.dims), 0, batches[:1], task.heldout_batches(4), {})
    start = make_method(method, ctx)
    start.setup(task.fresh_student(0))
    before = start.final_ranks()
    run = train_run(ctx, method, 3e-3, batches, score_val=False)
    assert run["ranks"] != before
    if method == "online":  # it starts at online_initial x P and grows towards P
        assert sum(r * sum(task.dims[n]) for n, r in before.items()) <= tiny_cfg.online_initial * ctx.budget
        assert run["spent"] > tiny_cfg.online_initial * ctx.budget
