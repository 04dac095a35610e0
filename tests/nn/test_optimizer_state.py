"""Optimizer state follows rank changes, so inactive slots stay exactly zero while training."""

import pytest
import torch
from torch import nn

from lorambo import LoRAMBoLinear
from lorambo.nn import StaleOptimizerStateWarning


def train_steps(layer, opt, n=3):
    for _ in range(n):
        opt.zero_grad()
        layer(torch.randn(8, layer.in_features)).square().mean().backward()
        opt.step()


def test_shrink_with_optimizer_keeps_inactive_slots_zero_under_adamw():
    layer = LoRAMBoLinear(nn.Linear(12, 10), rank=6, capacity=8)
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2, weight_decay=0.1)
    train_steps(layer, opt)
    layer.set_rank(3, optimizer=opt)
    for name in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(opt.state[layer.lora_A][name][3:], torch.zeros(5, 12))
        assert torch.equal(opt.state[layer.lora_B][name][:, 3:], torch.zeros(10, 5))
    train_steps(layer, opt)
    assert torch.equal(layer.lora_A[3:], torch.zeros(5, 12)) and torch.equal(layer.lora_B[:, 3:], torch.zeros(10, 5))


def test_without_reset_stale_moments_stay_at_dropped_slots():
    """Why the helper exists: the same shrink without it leaves Adam's moments at the dropped
    slots, for a regrowth to inherit (the step post-hook keeps the slots themselves at zero)."""
    layer = LoRAMBoLinear(nn.Linear(12, 10), rank=6, capacity=8)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    train_steps(layer, opt)
    with pytest.warns(StaleOptimizerStateWarning, match="Pass optimizer=<that Adam>"):
        layer.set_rank(3)
    train_steps(layer, opt, 1)
    assert opt.state[layer.lora_A]["exp_avg"][3:6].abs().sum() > 0
    assert torch.count_nonzero(layer.lora_A[3:]) == 0 and torch.count_nonzero(layer.lora_B[:, 3:]) == 0


def test_regrowth_resets_moments_and_step_when_all_slots_are_new():
    layer = LoRAMBoLinear(nn.Linear(6, 6), rank=2, capacity=4)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    train_steps(layer, opt)
    layer.set_rank(0, optimizer=opt)
    layer.set_rank(3, optimizer=opt)
    assert float(opt.state[layer.lora_A]["step"]) == 0.0
    assert torch.equal(opt.state[layer.lora_A]["exp_avg"], torch.zeros(4, 6))


def test_keep_components_moves_state_with_the_components():
    layer = LoRAMBoLinear(nn.Linear(6, 5), rank=4, capacity=4)
    opt = torch.optim.SGD(layer.parameters(), lr=1e-2, momentum=0.9)
    with torch.no_grad():
        layer.lora_B.normal_()
    train_steps(layer, opt)
    buf_a = opt.state[layer.lora_A]["momentum_buffer"].clone()
    buf_b = opt.state[layer.lora_B]["momentum_buffer"].clone()
    layer.keep_components([3, 0], optimizer=opt)
    assert torch.equal(opt.state[layer.lora_A]["momentum_buffer"][:2], buf_a[[3, 0]])
    assert torch.equal(opt.state[layer.lora_B]["momentum_buffer"][:, :2], buf_b[:, [3, 0]])
    assert torch.equal(opt.state[layer.lora_A]["momentum_buffer"][2:], torch.zeros(2, 6))


def test_reset_slot_state_refuses_slots_outside_the_pool():
    # -1 used to reset the last slot (counted from the end) and 1.5 slot 1, without a word
    import pytest

    import lorambo

    torch.manual_seed(2)
    layer = LoRAMBoLinear(nn.Linear(12, 10), rank=4, capacity=4, name="q_proj")
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    with torch.no_grad():
        layer.lora_B.normal_()
    train_steps(layer, opt)
    before = opt.state[layer.lora_B]["exp_avg"].clone()
    with pytest.raises(ValueError, match=r"'q_proj': slots \[-1\] outside \[0, capacity = 4\)"):
        lorambo.reset_slot_state(opt, layer, [-1])
    with pytest.raises(ValueError, match=r"'q_proj': slots \[4\] outside \[0, capacity = 4\)"):
        lorambo.reset_slot_state(opt, layer, [2, 4])  # one past the last slot, after a valid one
    with pytest.raises(TypeError, match=r"'q_proj': slot must be an int, got 1.5"):
        lorambo.reset_slot_state(opt, layer, [1.5])
    assert torch.equal(opt.state[layer.lora_B]["exp_avg"], before)
