"""Online growth when a forward is followed by several backward passes (``retain_graph=True``,
one loss per task): the captured dY of a layer call are summed over the passes, as the
parameters' gradients are. Only the last pass's dY was kept, so the decision saw one loss."""

import pytest
import torch
from torch import nn

from lorambo.optimizer import LoRAMBoOptimizer

DT = torch.float64

pytestmark = pytest.mark.usefixtures("one_thread")


def _decide(separate_backwards: bool):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16, dtype=DT), nn.Tanh(), nn.Linear(16, 4, dtype=DT))
    alloc = LoRAMBoOptimizer(model, 10**6, sensitivity_method="frobenius", capacity={"0": 8, "2": 4},
                             interval=1, sketch_rank=2)
    alloc.configure({"0": 1, "2": 1})
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 8, generator=gen, dtype=DT), torch.randn(32, 4, generator=gen, dtype=DT)
    with alloc.capture(0):
        out = model(x)
        losses = ((out - y) ** 2).mean(), out.abs().mean() * 3
        if separate_backwards:
            losses[0].backward(retain_graph=True)
            losses[1].backward()
        else:
            sum(losses).backward()
    return [(r["layer"], r["new_rank"], r["gains"]) for r in alloc.step(0)]


def test_backward_passes_through_one_forward_decide_as_their_summed_loss():
    want = _decide(separate_backwards=False)
    got = _decide(separate_backwards=True)
    assert want and [(n, r) for n, r, _ in got] == [(n, r) for n, r, _ in want]
    for (_, _, g), (_, _, w) in zip(got, want):
        torch.testing.assert_close(torch.tensor(g), torch.tensor(w), rtol=1e-10, atol=0)
