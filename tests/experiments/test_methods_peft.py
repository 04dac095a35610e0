"""peft's AdaLoRA and EVA as experiment methods (lorambo/experiments/methods_peft.py)."""

import pytest

from lorambo.experiments.methods import RunContext, budget_of
from lorambo.experiments.methods_peft import _module_of
from lorambo.experiments.registry import make_method

pytestmark = pytest.mark.slow


def test_adalora_asked_for_ranks_before_its_final_allocation_says_so(planted_task, tiny_cfg):
    """Before peft's final masking step AdaLoRA has no rank pattern: that is an error naming the
    cause, not an AttributeError from inside peft's config."""
    pytest.importorskip("peft")
    ctx = RunContext(planted_task, tiny_cfg, 1.0, budget_of(1.0, planted_task.dims), 0, [], [])
    run = make_method("adalora", ctx)
    run.setup(planted_task.fresh_student(0))
    with pytest.raises(RuntimeError, match="AdaLoRA never reached its final allocation step"):
        run.final_ranks()


def _adalora(task, cfg, level):
    ctx = RunContext(task, cfg, level, budget_of(level, task.dims), 0, [], [])
    run = make_method("adalora", ctx)
    run.setup(task.fresh_student(0))
    return run, ctx


def test_adalora_starts_at_growth_factor_times_the_level_with_scaling_one(planted_task, tiny_cfg):
    """The settings docs/ and the module docstring give: init_r = ceil(growth_factor x level),
    target_r = the level, tinit/tfinal a fifth of the steps, deltaT = 1, lora_alpha = init_r."""
    pytest.importorskip("peft")
    cfg = tiny_cfg.replace(steps=25, growth_factor=3.0)
    run, ctx = _adalora(planted_task, cfg, 2.0)
    c = run.config
    assert (c.init_r, c.target_r, c.lora_alpha) == (6, 2, 6)
    assert (c.tinit, c.tfinal, c.deltaT, c.total_step, c.lora_dropout) == (5, 5, 1, 25, 0.0)
    shapes = {_module_of(n): p.shape for n, p in run.model.named_parameters() if ".lora_E." in n}
    assert set(shapes) == set(planted_task.dims) and set(shapes.values()) == {(6, 1)}   # every layer, init_r


def test_adalora_masks_to_a_budget_counted_in_parameters(planted_task, tiny_cfg):
    """peft's rank budgets mapped onto parameters: its starting budget keeps every triplet, its
    target keeps the best-scored triplets whose cost fits P (and no fewer)."""
    pytest.importorskip("peft")
    run, ctx = _adalora(planted_task, tiny_cfg, 1.0)
    import torch

    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():                 # peft starts E at zero: every score would tie at 0
        for n, p in run.model.named_parameters():
            if ".lora_E." in n:
                p.copy_(torch.randn(p.shape, generator=gen))
    batch = planted_task.train_batches(0, 1, tiny_cfg.batch_size)[0]
    planted_task.loss(run.model, batch).backward()
    run.allocator.update_ipt(run.model)
    alloc = run.allocator
    kept_all = alloc.mask_to_budget(run.model, alloc.init_bgt)
    assert all(all(m) for m in kept_all.values()) and len(kept_all) == len(planted_task.names)
    kept = alloc.mask_to_budget(run.model, alloc.target_bgt)
    cost = sum(sum(m) * ctx.costs[_module_of(n)] for n, m in kept.items())
    assert ctx.budget - max(ctx.costs.values()) < cost <= ctx.budget
