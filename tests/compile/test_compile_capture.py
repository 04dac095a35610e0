"""Online growth on a torch.compile'd model. torch.compile guards on no module hooks by default,
so code compiled before a decision step never runs the activation capture's hooks: every
decision was skipped with a warning that only said to run the step inside capture(), which the
loop did. The warning now names the setting, and with it the compiled run decides as the eager one.
FisherProxy, attached after the first compiled call, gathers what it gathers eagerly in either setting."""

import warnings

import pytest
import torch
from torch import nn

import lorambo
from lorambo.optimizer import LoRAMBoOptimizer
from lorambo.sensitivity import FisherProxy


def _train(compiled: bool, backend: str = "eager"):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    lorambo.configure_model(net, 1, capacity=4)
    budget = sum(3 * (m.in_features + m.out_features) for m in lorambo.lora_layers(net).values())
    alloc = LoRAMBoOptimizer(net, budget, warmup_steps=2, interval=2, sketch_rank=2, seed=1)
    opt = alloc.make_optimizer(lr=1e-2)
    run = torch.compile(net, backend=backend) if compiled else net
    g = torch.Generator().manual_seed(0)
    for step in range(4):
        x, y = torch.randn(16, 8, generator=g), torch.randn(16, 4, generator=g)
        with alloc.capture(step):
            ((run(x) - y) ** 2).mean().backward()
        alloc.step(step, optimizer=opt)
        opt.step()
        opt.zero_grad()
    return alloc.decisions, alloc.current_ranks()


def test_default_compile_settings_skip_decisions_with_a_warning_naming_the_fix():
    torch._dynamo.reset()
    with pytest.warns(RuntimeWarning, match=r"torch._dynamo.config.skip_nnmodule_hook_guards = False"):
        decisions, ranks = _train(compiled=True)
    assert decisions == [] and set(ranks.values()) == {1}


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])  # aot_eager: AOTAutograd's graphs, as inductor's
def test_with_hook_guards_the_compiled_run_decides_as_the_eager_one(backend):
    eager_decisions, eager_ranks = _train(compiled=False)
    assert eager_decisions
    torch._dynamo.reset()
    with torch._dynamo.config.patch(skip_nnmodule_hook_guards=False), warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        decisions, ranks = _train(compiled=True, backend=backend)
    assert [(r["layer"], r["event"], r["old_rank"], r["new_rank"]) for r in decisions] == \
        [(r["layer"], r["event"], r["old_rank"], r["new_rank"]) for r in eager_decisions]
    assert ranks == eager_ranks


def _fisher_traces(compiled: bool, backend: str = "eager"):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    lorambo.configure_model(net, 2, capacity=4)
    run = torch.compile(net, backend=backend) if compiled else net
    g = torch.Generator().manual_seed(0)
    run(torch.randn(4, 8, generator=g)).sum().backward()  # compiled before the proxy's hooks exist
    with FisherProxy(net) as fisher:
        for _ in range(2):
            x, y = torch.randn(16, 8, generator=g), torch.randn(16, 4, generator=g)
            ((run(x) - y) ** 2).mean().backward()
    return fisher.estimates()


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])  # aot_eager: AOTAutograd's graphs, as inductor's
@pytest.mark.parametrize("hook_guards", [False, True])
def test_fisher_proxy_on_code_compiled_before_it_matches_eager(hook_guards, backend):
    """FisherProxy hooks the layers, not the compiled frame: they run in either setting."""
    eager = _fisher_traces(compiled=False)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(skip_nnmodule_hook_guards=not hook_guards):
        compiled = _fisher_traces(compiled=True, backend=backend)
    assert compiled.keys() == eager.keys()
    for name in eager:
        assert compiled[name].value == pytest.approx(eager[name].value, rel=1e-6), name
        assert compiled[name].num_probes == eager[name].num_probes, name
