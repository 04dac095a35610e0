"""peft's AdaLoRA held to a budget counted in parameters (lorambo/experiments/methods_peft.py), on a
tiny random BERT: its peft settings for each level and growth factor, the triplets its masking keeps
at every scheduled budget and at exactly P (scores and costs recomputed here from peft's importance
averages and the layer shapes), the steps at which it masks, the penalty's device and dtype, and the
parameter names it maps to layers."""

import pytest
import torch
from test_methods_peft_budget import TinyTask, _trained_adalora  # tests/experiments/test_methods_peft_budget.py

from lorambo.experiments.methods import RunContext, budget_of
from lorambo.experiments.methods_peft import _module_of
from lorambo.experiments.registry import make_method
from lorambo.experiments.student import short

pytest.importorskip("peft")


def _setup(task, cfg, level):
    ctx = RunContext(task, cfg, level, budget_of(level, task.dims), 0, [], [])
    run = make_method("adalora", ctx)
    model = run.setup(task.fresh_student(0))
    return run, model, ctx


@pytest.mark.parametrize("level, growth_factor, init_r, target_r", [
    (2.0, 1.0, 3, 2),     # growth 1 leaves nothing to prune: one rank more than the target
    (1.0, 2.5, 3, 1),     # ceil(2.5), not floor
    (0.5, 2.0, 2, 1),     # the target is at least one rank, and the start above it
    (1.5, 2.0, 3, 2),     # the target rounds the level up
    (1.0, 2.0, 2, 1),
])
def test_adalora_ranks_follow_the_level_and_growth_factor(tiny_cfg, level, growth_factor, init_r, target_r):
    """init_r = ceil(growth_factor x level), at least target_r + 1; target_r = the level rounded
    up; lora_alpha = init_r (scaling 1); tinit = tfinal = a fifth of the steps, deltaT = 1; every
    target layer starts with init_r triplets."""
    task = TinyTask(seed=11)
    for steps in (5, 12):
        cfg = tiny_cfg.replace(steps=steps, growth_factor=growth_factor)
        run, model, _ = _setup(task, cfg, level)
        c = run.config
        assert (c.init_r, c.target_r, c.lora_alpha) == (init_r, target_r, init_r)
        assert (c.tinit, c.tfinal, c.deltaT, c.total_step) == (steps // 5, steps // 5, 1, steps)
        shapes = {short(n): model.get_submodule(n).lora_E["default"].shape for n in task.names}
        assert shapes == {short(n): (init_r, 1) for n in task.names}


def _scored(task, cfg, level, seed):
    """AdaLoRA set up with random triplets and two of peft's importance updates behind it; the
    model returned is the one peft's ``update_and_allocate`` hands its allocator."""
    run, peft_model, ctx = _setup(task, cfg, level)
    model = peft_model.base_model.model
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():             # peft starts E at zero: every E score would tie at 0
        for n, p in model.named_parameters():
            if ".lora_" in n:
                p.copy_(torch.randn(p.shape, generator=gen))
    for batch in task.eva_batches(2):
        model(batch).square().mean().backward()
        run.allocator.update_ipt(model)
        model.zero_grad(set_to_none=True)
    return run, model, ctx


def _ranked_triplets(run, model, task):
    """[(score, layer, index, cost)], best first: peft's triplet importance recomputed from its
    averages, each triplet's cost (d + k) from its layer's shapes."""
    alloc = run.allocator
    score = {n: alloc.exp_avg_ipt[n] * alloc.exp_avg_unc[n] for n in alloc.exp_avg_ipt}
    triplets = []
    for n in task.names:
        layer = model.get_submodule(n)
        a, b, e = (score[f"{n}.lora_{x}.default"] for x in "ABE")
        total = e.view(-1) + (a.mean(dim=1) + b.mean(dim=0))               # peft's triplet importance
        cost = layer.lora_B["default"].shape[0] + layer.lora_A["default"].shape[1]
        triplets += [(float(s), n, i, cost) for i, s in enumerate(total)]
    return sorted(triplets, reverse=True)


def _expected_kept(run, model, ctx, task, rank_budget):
    """{layer: [kept?] per triplet}: the best-scored triplets, in score order, while their cost
    fits the rank budget mapped linearly onto parameters."""
    triplets = _ranked_triplets(run, model, task)
    init_params = run.config.init_r * sum(c for _, n, i, c in triplets if i == 0)
    frac = (rank_budget - run.allocator.init_bgt) / (run.allocator.target_bgt - run.allocator.init_bgt)
    limit = init_params + frac * (ctx.budget - init_params)
    kept, used = {n: [False] * run.config.init_r for n in task.names}, 0
    for _, n, i, cost in triplets:
        if used + cost > limit:
            break
        kept[n][i], used = True, used + cost
    return kept, used, limit


@pytest.mark.parametrize("seed", [0, 1])
def test_adalora_masking_keeps_the_best_triplets_that_fit_each_scheduled_budget(tiny_cfg, seed):
    """At peft's starting rank budget every triplet is kept (one mask entry per triplet); below it,
    the rank budget is mapped linearly onto parameters (init_r x sum(d + k) down to P) and the kept
    triplets are the best-scored ones whose cost fits, their E left as it was and the others zeroed."""
    task = TinyTask(seed=12 + seed)
    cfg = tiny_cfg.replace(steps=20, growth_factor=3.0)
    run, model, ctx = _scored(task, cfg, 1.0, seed)
    alloc = run.allocator
    assert alloc.init_bgt == 3 * len(task.names) and alloc.target_bgt == len(task.names)
    full = alloc.mask_to_budget(model, alloc.init_bgt)
    assert {short(_module_of(n)): m for n, m in full.items()} == {short(n): [True] * 3 for n in task.names}

    spent_at = []
    for rank_budget in range(alloc.init_bgt - 1, alloc.target_bgt - 1, -1):      # every budget of the schedule
        before = {n: model.get_submodule(n).lora_E["default"].detach().clone() for n in task.names}
        kept, used, limit = _expected_kept(run, model, ctx, task, rank_budget)
        pattern = {_module_of(n): m for n, m in alloc.mask_to_budget(model, rank_budget).items()}
        assert pattern == {short(n): m for n, m in kept.items()}, rank_budget
        for n in task.names:
            mask = torch.tensor(kept[n]).view(-1, 1)
            after = model.get_submodule(n).lora_E["default"]
            assert torch.equal(after, torch.where(mask, before[n], torch.zeros_like(after))), (rank_budget, n)
        spent_at.append(used)
        assert used <= limit < used + max(ctx.costs.values())
    assert spent_at == sorted(spent_at, reverse=True) and len(set(spent_at)) > len(spent_at) // 2
    assert spent_at[-1] > ctx.budget - max(ctx.costs.values())


def test_adalora_final_masking_spends_up_to_exactly_p(tiny_cfg):
    """At the target budget, a P that the best k triplets cost exactly keeps all k; one parameter
    less keeps k - 1."""
    task = TinyTask(seed=16)
    run, model, ctx = _scored(task, tiny_cfg.replace(steps=20, growth_factor=3.0), 1.0, 4)
    ranked = _ranked_triplets(run, model, task)
    k = len(task.names) + 1
    assert len({c for *_, c in ranked[:k]}) > 1                  # both kinds of layer among them
    for budget, kept in ((sum(c for *_, c in ranked[:k]), k), (sum(c for *_, c in ranked[:k]) - 1, k - 1)):
        ctx.budget = budget
        pattern = run.allocator.mask_to_budget(model, run.allocator.target_bgt)
        want = {short(n): [False] * 3 for n in task.names}
        for _, n, i, _ in ranked[:kept]:
            want[short(n)][i] = True
        assert {_module_of(n): m for n, m in pattern.items()} == want, budget


def test_adalora_allocates_on_pefts_step_count(tiny_cfg):
    """``after_step(step)`` hands peft the step just taken (0 first, as peft's own loop does): no
    triplet is masked through step tinit, the cubic schedule masks from step tinit + 1, and the
    final pattern is set at step total_step - tfinal."""
    from lorambo.optim import AdamW

    task = TinyTask(seed=17)
    run, model, _ = _setup(task, tiny_cfg.replace(steps=10, growth_factor=3.0), 1.0)
    c = run.config
    assert (c.tinit, c.tfinal, c.total_step) == (2, 2, 10)
    optimizer = AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    batch = task.eva_batches(1)[0]
    masked, patterns = [], []
    for step in range(c.total_step):
        model(batch).square().mean().backward()
        optimizer.step()
        run.after_step(step)
        optimizer.zero_grad(set_to_none=True)
        masked.append(sum(int((model.get_submodule(n).lora_E["default"] == 0).sum()) for n in task.names))
        patterns.append(c.rank_pattern)
    assert masked[:c.tinit + 1] == [0] * (c.tinit + 1) and all(patterns[i] is None for i in range(c.tinit + 1))
    assert all(m > 0 for m in masked[c.tinit + 1:])
    final = c.total_step - c.tfinal
    assert patterns[final] is patterns[-1] and patterns[final - 1] is not patterns[final]


def test_adalora_reports_plain_ints(tiny_cfg):
    """The ranks go into the run's JSON record and the parameter count is compared with them:
    both are Python ints, not tensors."""
    run, ctx = _trained_adalora(TinyTask(seed=14), tiny_cfg.replace(steps=10), 1.0)
    ranks, params = run.final_ranks(), run.trainable_lora_params()
    assert all(type(r) is int for r in ranks.values()) and type(params) is int
    assert params == sum(r * ctx.costs[n] for n, r in ranks.items()) > 0


def test_adalora_penalty_is_built_on_the_parameters_device_and_dtype(tiny_cfg):
    """The identity of the orthogonality penalty is made where the factors are: a model on another
    device (meta here, standing in for CUDA) or in bfloat16 gets its penalty there, in its dtype."""
    task = TinyTask(seed=15)
    run, model, _ = _setup(task, tiny_cfg, 1.0)
    model.to(device="meta", dtype=torch.bfloat16)
    penalty = run.extra_loss(model)
    assert penalty.device.type == "meta" and penalty.dtype == torch.bfloat16 and penalty.requires_grad


def test_module_of_maps_every_lora_parameter_name_to_its_layer():
    prefix = "base_model.model.bert.encoder.layer.1.attention.self.query"
    for suffix in (".%s.default", ".lora_E.default", ".lora_A.default", ".lora_B.default"):
        assert _module_of(prefix + suffix) == "layer.1.attention.self.query", suffix
    with pytest.raises(ValueError, match=r"_module_of: 'bert\.encoder\.layer\.1\.output\.dense\.weight'"):
        _module_of("bert.encoder.layer.1.output.dense.weight")
