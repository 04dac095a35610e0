"""SGD momentum starts of new slots (lorambo.nn.fresh_momentum) with several models in one
process, each trained by its own thread: the step pre-hook looks up only its optimizer's own
parameters, so another thread's rank change adding a record cannot crash the step with
"dictionary changed size during iteration" (seen within seconds with two threads training two
models when the hook listed the records of every model)."""

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from lorambo import LoRAMBoLinear
from lorambo.nn import fresh_momentum

DT = torch.float64


class _AddedWhileListed(WeakIdKeyDictionary):
    """The records, with another thread's rank change landing while they are being listed (the
    one moment an addition breaks a step: between two entries of the listing)."""

    def __init__(self, other_thread):
        super().__init__()
        self.other_thread = other_thread

    def _listing(self, entries):
        for i, entry in enumerate(entries):
            if i == 0 and self.other_thread is not None:
                self.other_thread, run = None, self.other_thread
                run()
            yield entry

    def items(self):
        return self._listing(super().items())

    def keys(self):
        return self._listing(super().keys())

    def __iter__(self):
        return self._listing(super().__iter__())


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


def test_records_added_by_another_thread_during_a_step_are_kept(monkeypatch):
    mine, my_opt, my_x = _stepped_sgd(0)
    theirs, their_opt, their_x = _stepped_sgd(1)
    records = _AddedWhileListed(lambda: theirs.set_rank(3, optimizer=their_opt))
    monkeypatch.setattr(fresh_momentum, "_PENDING", records)
    mine.set_rank(3, optimizer=my_opt)
    _grown_slot_starts_fresh(mine, my_opt, my_x)  # the other thread grows its model meanwhile
    theirs.set_rank(3, optimizer=their_opt)  # a no-op if it grew during the step; else it grows now
    _grown_slot_starts_fresh(theirs, their_opt, their_x)
    assert len(records) == 0
