"""torch.optim.LBFGS keeps its curvature memory as flat vectors over all parameters, with no part
per slot. A rank change given an LBFGS restarts it: the next step is a fresh LBFGS's on the
adapter (checked in float64 against LBFGS on plain tensors of the active slots), and the
inactive slots stay exactly zero (with the stale memory a dropped row of A ended 0.52 off zero)."""

import pytest
import torch
from torch import nn

from lorambo import LoRAMBoLinear
from lorambo.nn import keep_components_many

DT = torch.float64
SETTINGS = dict(lr=0.5, history_size=5, max_iter=3)

CHANGES = {
    "shrink": lambda layer, opt: layer.set_rank(1, optimizer=opt),
    "grow": lambda layer, opt: layer.set_rank(4, optimizer=opt, generator=torch.Generator().manual_seed(2)),
    "keep_components": lambda layer, opt: layer.keep_components([2, 0], optimizer=opt),
    "keep_components_many": lambda layer, opt: keep_components_many([(layer, [2, 0])], opt),
}


def _closure(opt, x, y, forward):
    def closure():
        opt.zero_grad()
        loss = (forward(x) - y).square().sum()
        loss.backward()
        return loss
    return closure


@pytest.mark.parametrize("change", list(CHANGES))
def test_a_rank_change_restarts_lbfgs_as_a_fresh_one(change):
    gen = torch.Generator().manual_seed(0)
    layer = LoRAMBoLinear(nn.Linear(6, 8, dtype=DT), rank=3, capacity=5)
    with torch.no_grad():
        layer.lora_B[:, :3].copy_(torch.randn(8, 3, dtype=DT, generator=gen))
    x, y = torch.randn(5, 6, dtype=DT, generator=gen), torch.randn(5, 8, dtype=DT, generator=gen)
    opt = torch.optim.LBFGS([layer.lora_A, layer.lora_B], **SETTINGS)
    for _ in range(3):
        opt.step(_closure(opt, x, y, layer))
    CHANGES[change](layer, opt)
    r = layer.rank
    a, b = (nn.Parameter(t.detach().clone()) for t in (layer.lora_A[:r], layer.lora_B[:, :r]))
    ref = torch.optim.LBFGS([a, b], **SETTINGS)
    weight, bias, scaling = layer.weight.detach(), layer.bias.detach(), layer.scaling
    ref.step(_closure(ref, x, y, lambda v: v @ weight.T + bias + scaling * (v @ a.T) @ b.T))
    opt.step(_closure(opt, x, y, layer))
    torch.testing.assert_close(layer.lora_A[:r].detach(), a.detach(), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(layer.lora_B[:, :r].detach(), b.detach(), rtol=1e-9, atol=1e-12)
    assert not layer.lora_A[r:].any() and not layer.lora_B[:, r:].any()


@pytest.mark.parametrize("change", list(CHANGES))
def test_an_lbfgs_of_another_model_keeps_its_memory(change):
    """A rank change given, by mistake, the LBFGS that trains another model (a teacher beside the
    student) emptied that LBFGS's memory; none of its coordinates changed, so it keeps it: its
    next step is that of an LBFGS that never saw the change (plain tensors, float64)."""
    gen = torch.Generator().manual_seed(0)
    layer = LoRAMBoLinear(nn.Linear(6, 8, dtype=DT), rank=3, capacity=5)
    with torch.no_grad():
        layer.lora_B[:, :3].copy_(torch.randn(8, 3, dtype=DT, generator=gen))
    other = nn.Linear(6, 8, dtype=DT)
    x, y = torch.randn(5, 6, dtype=DT, generator=gen), torch.randn(5, 8, dtype=DT, generator=gen)
    w, b = (nn.Parameter(t.detach().clone()) for t in (other.weight, other.bias))
    opt, ref = torch.optim.LBFGS(other.parameters(), **SETTINGS), torch.optim.LBFGS([w, b], **SETTINGS)
    for _ in range(3):
        opt.step(_closure(opt, x, y, other))
        ref.step(_closure(ref, x, y, lambda v: v @ w.T + b))
    CHANGES[change](layer, opt)
    assert opt.state[other.weight], "the other model's LBFGS memory was emptied"
    opt.step(_closure(opt, x, y, other))
    ref.step(_closure(ref, x, y, lambda v: v @ w.T + b))
    torch.testing.assert_close(other.weight.detach(), w.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(other.bias.detach(), b.detach(), rtol=1e-12, atol=1e-14)
