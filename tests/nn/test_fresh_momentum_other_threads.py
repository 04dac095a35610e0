"""SGD momentum starts of new slots (lorambo.nn.fresh_momentum) with several models in one
process, each trained by its own thread: each SGD keeps its waiting slots in its own state, so
another thread's rank change landing while a step looks up its records neither crashes the step
("dictionary changed size during iteration", seen within seconds with two threads when the
records of every model lived in one process-wide dictionary) nor loses either model's records."""

from collections import defaultdict

import torch
from torch import nn

from lorambo import LoRAMBoLinear

DT = torch.float64


class _OtherThreadDuringLookups(defaultdict):
    """An SGD's state, with another thread's rank change landing at the first lookup of a step."""

    def __init__(self, state, other_thread):
        super().__init__(dict, state)
        self.other_thread = other_thread

    def get(self, key, default=None):
        if self.other_thread is not None:
            self.other_thread, run = None, self.other_thread
            run()
        return super().get(key, default)


def _stepped_sgd(seed):
    """A rank-2 layer with a nonzero B and the SGD (momentum, dampening) that has stepped it."""
    gen = torch.Generator().manual_seed(seed)
    layer = LoRAMBoLinear(nn.Linear(6, 5, dtype=DT), rank=2, capacity=4)
    with torch.no_grad():
        layer.lora_B[:, :2] = torch.randn(5, 2, dtype=DT, generator=gen)
    opt = torch.optim.SGD([layer.lora_A, layer.lora_B], lr=1e-2, momentum=0.9, dampening=0.5)
    x = torch.randn(4, 6, dtype=DT, generator=gen)
    layer(x).square().sum().backward()
    opt.step()
    opt.zero_grad()
    return layer, opt, x


def _grown_slot_starts_fresh(layer, opt, x):
    """Step with the grown slot 2: its first buffer is its first update direction d (B's column;
    A's row gets no gradient through B's zero column), as under a fresh SGD."""
    layer(x).square().sum().backward()
    d = layer.lora_B.grad[:, 2].clone()
    assert d.abs().min() > 0
    opt.step()
    torch.testing.assert_close(opt.state[layer.lora_B]["momentum_buffer"][:, 2], d, rtol=1e-12, atol=0)


def test_records_added_by_another_thread_during_a_step_are_kept():
    mine, my_opt, my_x = _stepped_sgd(0)
    theirs, their_opt, their_x = _stepped_sgd(1)
    mine.set_rank(3, optimizer=my_opt)
    my_opt.state = _OtherThreadDuringLookups(my_opt.state, lambda: theirs.set_rank(3, optimizer=their_opt))
    _grown_slot_starts_fresh(mine, my_opt, my_x)  # the other thread grows its model meanwhile
    assert my_opt.state.other_thread is None  # it did
    _grown_slot_starts_fresh(theirs, their_opt, their_x)
