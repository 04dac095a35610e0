"""LoRAMBoOptimizer given a model wrapped by torch.compile or DDP names its layers as in the plain
model, without the wrapper's prefix ('_orig_mod.0', 'module.0'), so its ranks, decisions and
state_dict fit an allocator on the plain model, and a run saved with compile resumes without it
(rather than failing with "the state is for layers ['_orig_mod.0', ...]")."""

import copy

import torch
from torch import nn

import lorambo
from lorambo.optimizer import LoRAMBoOptimizer

DT = torch.float64
BUDGET = 6 * (14 + 13)


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8, dtype=DT), nn.Tanh(), nn.Linear(8, 5, dtype=DT))


def _batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(9, 6, generator=g, dtype=DT), torch.randn(9, 5, generator=g, dtype=DT)) for _ in range(3)]


def _loss(model, batch):
    return ((model(batch[0]) - batch[1]) ** 2).mean()


def _train(compiled: bool):
    """Allocate, configure and take 3 steps with a decision at each; the allocator gets the model
    the loop calls."""
    net = _net()
    model = torch.compile(net, backend="eager") if compiled else net
    alloc = LoRAMBoOptimizer(model, BUDGET, sensitivity_method="gradient", interval=1, sketch_rank=2, seed=1,
                             initial_budget=BUDGET // 3)
    ranks = alloc.compute_optimal_ranks(_batches(), _loss)
    assert alloc.configure() is model
    opt = alloc.make_optimizer(lr=1e-2)
    for step, batch in enumerate(_batches()):
        with alloc.capture(step, batch):
            _loss(model, batch).backward()
        alloc.step(step)
        opt.step()
        opt.zero_grad()
    return net, alloc, ranks


def test_a_compiled_model_is_named_and_decided_as_the_plain_one():
    plain_net, plain, plain_ranks = _train(compiled=False)
    assert plain.decisions  # growth happened: the decisions below name layers
    torch._dynamo.reset()
    with torch._dynamo.config.patch(skip_nnmodule_hook_guards=False):  # see test_compile_capture.py
        net, alloc, ranks = _train(compiled=True)
    assert alloc.names == plain.names == ["0", "2"]
    assert ranks == plain_ranks
    assert [(r["layer"], r["event"], r["old_rank"], r["new_rank"]) for r in alloc.decisions] == \
        [(r["layer"], r["event"], r["old_rank"], r["new_rank"]) for r in plain.decisions]
    assert alloc.current_ranks() == plain.current_ranks()

    # saved with compile, resumed without it: the same model state, an allocator on the plain model
    resumed_net = copy.deepcopy(net)
    resumed = LoRAMBoOptimizer(resumed_net, BUDGET, sensitivity_method="gradient", interval=1, sketch_rank=2,
                               seed=1, initial_budget=BUDGET // 3)
    resumed.make_optimizer(lr=1e-2)
    resumed.load_state_dict(alloc.state_dict())
    assert resumed.decisions == alloc.decisions and resumed.ranks == ranks
    # and the other way round
    again = LoRAMBoOptimizer(torch.compile(copy.deepcopy(plain_net), backend="eager"), BUDGET,
                             sensitivity_method="gradient", interval=1, sketch_rank=2, seed=1,
                             initial_budget=BUDGET // 3)
    again.make_optimizer(lr=1e-2)
    again.load_state_dict(plain.state_dict())
    assert again.decisions == plain.decisions


def test_a_ddp_model_is_named_as_the_plain_one(one_process_group):
    net = lorambo.configure_model(_net(), 2, capacity=4)
    ddp = nn.parallel.DistributedDataParallel(net)
    alloc = LoRAMBoOptimizer(ddp, BUDGET, sensitivity_method="gradient")
    assert alloc.names == ["0", "2"] and alloc.current_ranks() == {"0": 2, "2": 2}
    alloc.make_optimizer()
    plain = LoRAMBoOptimizer(net, BUDGET, sensitivity_method="gradient")
    plain.make_optimizer()
    plain.load_state_dict(alloc.state_dict())
    assert plain.current_ranks() == {"0": 2, "2": 2}
