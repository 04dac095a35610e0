"""step()'s ``optimizer`` argument. Without it, step() edits the state of the optimizer from make_optimizer, exactly as
passing that optimizer does: a rank move's kept slots take their Adam moments and step counts
along, and the funded slot starts fresh. Without the edit the moved slots keep another slot's state. A wrapper inside accelerate's
accumulation defers the decision and returns an empty list of records."""

import types

import copy

import torch
from torch import nn

import lorambo
from lorambo.optimizer import LoRAMBoOptimizer

DT = torch.float64


def _setup():
    torch.manual_seed(5)
    net = nn.Sequential(nn.Linear(6, 10, dtype=DT), nn.Tanh(), nn.Linear(10, 3, dtype=DT))
    model = lorambo.configure_model(net, {"0": 3, "2": 2}, capacity={"0": 6, "2": 3})
    for layer in lorambo.lora_layers(model).values():  # trained-looking adapters: B != 0
        layer.lora_B.data[:, :layer.rank].normal_()
    spent = sum((m.in_features + m.out_features) * m.rank for m in lorambo.lora_layers(model).values())
    # budget spent: only a move (component 0 of "0" out) can fund growth
    opt = LoRAMBoOptimizer(model, total_budget=spent, warmup_steps=2, interval=10, move_threshold=0.5)
    torch_opt = opt.make_optimizer(lr=1e-2)
    return model, opt, torch_opt


def _run(pass_optimizer: bool):
    model, opt, torch_opt = _setup()
    gen = torch.Generator().manual_seed(9)
    scores = {"0": torch.tensor([0.1, 2.0, 3.0], dtype=DT), "2": torch.tensor([2.0, 3.0], dtype=DT)}
    records = []
    for step in range(3):
        x, y = torch.randn(16, 6, generator=gen, dtype=DT), torch.randn(16, 3, generator=gen, dtype=DT)
        with opt.capture(step):
            ((model(x) - y) ** 2).mean().backward()
        records += opt.step(step, optimizer=torch_opt if pass_optimizer else None,
                            component_scores=scores if step == 2 else None)
        torch_opt.step()
        torch_opt.zero_grad()
    return records, torch_opt.state_dict()["state"]


def test_step_edits_the_default_optimizer_as_when_it_is_passed():
    records, state = _run(pass_optimizer=False)
    expected_records, expected_state = _run(pass_optimizer=True)
    assert [(r["event"], r["layer"]) for r in records][:1] == [("shrink", "0")]  # the move happened
    assert records == expected_records
    assert state.keys() == expected_state.keys()
    for key in state:
        for name, value in state[key].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(expected_state[key][name])), (key, name)


class _Accumulating(torch.optim.Optimizer):
    """accelerate's AcceleratedOptimizer as step() reads it: ``.optimizer`` and ``.gradient_state``."""

    def __init__(self, optimizer, gradient_state):  # no super().__init__: it wraps, it holds nothing
        self.optimizer, self.gradient_state = optimizer, gradient_state
        self.state, self.param_groups = optimizer.state, optimizer.param_groups


def test_a_wrapper_that_skips_this_step_defers_the_decision_with_no_records():
    model, opt, torch_opt = _setup()
    gen = torch.Generator().manual_seed(4)
    scores = {"0": torch.tensor([0.1, 2.0, 3.0], dtype=DT), "2": torch.tensor([2.0, 3.0], dtype=DT)}
    state = types.SimpleNamespace(sync_gradients=False)
    wrapper = _Accumulating(torch_opt, state)
    before = opt.current_ranks()
    x, y = torch.randn(16, 6, generator=gen, dtype=DT), torch.randn(16, 3, generator=gen, dtype=DT)
    with opt.capture(2):
        ((model(x) - y) ** 2).mean().backward()
    assert opt.step(2, optimizer=wrapper, component_scores=scores) == []  # a list, as every step() returns
    assert opt.current_ranks() == before
    state.sync_gradients = True  # the micro-batch that ends the accumulation: the move is made
    assert [r["event"] for r in opt.step(2, optimizer=wrapper, component_scores=scores)] == ["shrink", "grow"]
