"""configure_model(..., optimizer=) on existing adapters: the optimizer state follows their rank
changes, as with set_rank(optimizer=)."""

import contextlib

import pytest
import torch
from torch import nn

from lorambo import configure_model
from lorambo.nn import StaleOptimizerStateWarning

DT = torch.float64


def _trained(rank=3):
    torch.manual_seed(0)
    model = configure_model(nn.Sequential(nn.Linear(6, 8, dtype=DT), nn.Tanh(), nn.Linear(8, 4, dtype=DT)),
                            rank, target_modules=["0", "2"], capacity=4)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randn(10, 6, dtype=DT)
    for _ in range(3):
        opt.zero_grad()
        model(x).square().sum().backward()
        opt.step()
    return model, opt, x


@pytest.mark.parametrize("with_optimizer", [True, False])
def test_shrunk_slots_lose_their_state_only_when_the_optimizer_is_given(with_optimizer):
    model, opt, x = _trained()
    with contextlib.nullcontext() if with_optimizer else pytest.warns(StaleOptimizerStateWarning):
        configure_model(model, 1, target_modules=["0", "2"], optimizer=opt if with_optimizer else None)
    opt.zero_grad()
    model(x).square().sum().backward()
    opt.step()
    dropped = sum(float(m.lora_A[1:].abs().sum() + m.lora_B[:, 1:].abs().sum()) for m in (model[0], model[2]))
    assert dropped == 0.0  # the step post-hook keeps inactive slots at zero either way
    stale = [bool(opt.state[m.lora_A]["exp_avg"][1:].any() or opt.state[m.lora_B]["exp_avg_sq"][:, 1:].any())
             for m in (model[0], model[2])]
    # why it is needed: without it Adam's moments stay at the dropped slots, for a regrowth to inherit
    assert stale == [not with_optimizer] * 2


def test_a_non_optimizer_is_refused_before_any_change():
    model, _, _ = _trained()
    with pytest.raises(TypeError, match=r"optimizer must be a torch optimizer .* or None, got int"):
        configure_model(model, 1, target_modules=["0", "2"], optimizer=3)
    assert (model[0].rank, model[2].rank) == (3, 3)


def test_lorambo_optimizer_configure_edits_the_state_of_its_default_optimizer():
    from lorambo.optimizer import LoRAMBoOptimizer

    model, _, x = _trained()
    alloc = LoRAMBoOptimizer(model, 10_000, sensitivity_method="frobenius")
    opt = alloc.make_optimizer(lr=1e-2)
    opt.zero_grad()
    model(x).square().sum().backward()
    opt.step()
    alloc.configure({"0": 1, "2": 1})
    for m in (model[0], model[2]):
        assert opt.state[m.lora_A]["slot_step"].tolist() == [1.0, 0.0, 0.0, 0.0]
        assert not opt.state[m.lora_B]["exp_avg"][:, 1:].any()
