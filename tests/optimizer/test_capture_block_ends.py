"""LoRAMBoOptimizer.capture records only inside its block: a forward and backward after the block
ends and before step() (a second loss, an evaluation with gradients) is not part of the decision."""

import copy

import torch
from torch import nn

import lorambo
from lorambo.optimizer import LoRAMBoOptimizer

DT = torch.float64


def _model():
    net = nn.Sequential(nn.Linear(6, 10, dtype=DT), nn.Tanh(), nn.Linear(10, 3, dtype=DT))
    return lorambo.configure_model(net, {"0": 1, "2": 1}, capacity={"0": 6, "2": 3})


def _loss(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def _decide(model, batch, after_block=None):
    opt = LoRAMBoOptimizer(model, total_budget=10_000, interval=1, sketch_rank=2, power_iters=8)
    with opt.capture(0):
        _loss(model, batch).backward()
    if after_block is not None:
        _loss(model, after_block).backward()
    return opt.step(0)


def test_a_pass_after_the_capture_block_is_not_in_the_decision():
    gen = torch.Generator().manual_seed(3)
    batch = (torch.randn(12, 6, generator=gen, dtype=DT), torch.randn(12, 3, generator=gen, dtype=DT))
    other = (10 * torch.randn(12, 6, generator=gen, dtype=DT), torch.randn(12, 3, generator=gen, dtype=DT))
    base = _model()
    alone, with_other, on_both = copy.deepcopy(base), copy.deepcopy(base), copy.deepcopy(base)
    expected = _decide(alone, batch)
    assert expected  # the step decided: the test compares decisions, not two empty lists
    assert _decide(with_other, batch, after_block=other) == expected
    # a check of the test itself: had the other pass been captured, the decision would differ
    opt = LoRAMBoOptimizer(on_both, total_budget=10_000, interval=1, sketch_rank=2, power_iters=8)
    with opt.capture(0):
        _loss(on_both, batch).backward()
        _loss(on_both, other).backward()
    assert opt.step(0) != expected
