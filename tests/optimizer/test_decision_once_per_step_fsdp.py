"""``lorambo.integrations.fsdp.allocator_step`` called again at a step whose decision changed
ranks (a plain loop that calls it after every micro-batch): the call takes no decision, as
``LoRAMBoOptimizer.step`` does, and gathers nothing for it. It resharded the model and gathered
every pool and its optimizer state (``full_pools``: collectives and a full copy per process) on
each repeated call, for a decision that was then refused."""

import contextlib

import pytest
import torch
from torch import nn

from lorambo.integrations import fsdp
from lorambo.optimizer import LoRAMBoOptimizer

DT = torch.float64

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_repeated_decision_step_gathers_nothing(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16, dtype=DT), nn.Tanh(), nn.Linear(16, 3, dtype=DT))
    alloc = LoRAMBoOptimizer(model, 2000, sensitivity_method="frobenius", target_modules=["0", "2"],
                             capacity=3, interval=2, sketch_rank=2)
    alloc.configure({"0": 1, "2": 1})
    opt = alloc.make_optimizer(lr=1e-2)
    gathered = []
    full_pools = fsdp.full_pools

    @contextlib.contextmanager
    def counting(*args, **kwargs):
        gathered.append(1)
        with full_pools(*args, **kwargs) as held:
            yield held

    monkeypatch.setattr(fsdp, "full_pools", counting)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(24, 8, dtype=DT, generator=gen), torch.randn(24, 3, dtype=DT, generator=gen)
    with alloc.capture(0):
        ((model(x) - y) ** 2).mean().backward()
    assert fsdp.allocator_step(alloc, 0, opt)  # the decision changed ranks
    assert len(gathered) == 1
    ranks = alloc.current_ranks()
    ((model(x) - y) ** 2).mean().backward()  # the next micro-batch of step 0
    with pytest.warns(RuntimeWarning, match=r"step 0 has changed ranks already"):
        assert fsdp.allocator_step(alloc, 0, opt) == []
    assert len(gathered) == 1  # nothing gathered for the refused repeat
    assert alloc.current_ranks() == ranks
