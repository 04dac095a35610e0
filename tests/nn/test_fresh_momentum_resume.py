"""A slot grown under SGD with dampening whose pool gets no gradient for a while (lora_B frozen
for a phase) waits for its first step across step boundaries; a checkpoint taken then
(save_adapter + optimizer.state_dict(), loaded into a fresh model and a fresh SGD) must still
start its momentum buffer as a fresh SGD does: buf = d, so the first step from 0 is -lr * d.
Found by tests/nn/test_pool_state_machine.py: the resumed run took -lr * (1 - dampening) * d."""

import copy
import io

import pytest
import torch
from torch import nn

import lorambo

LR, DAMPENING = 0.1, 0.5


def sgd(layer):
    return torch.optim.SGD([layer.lora_A, layer.lora_B], lr=LR, momentum=0.9, dampening=DAMPENING)


def base():
    return nn.Sequential(nn.Linear(6, 5)).double()


def resumed_with_waiting_slots(tmp_path, x, copied=False):
    """A rank-2 layer trained one step, grown to 4 while lora_B is frozen, stepped once more (B's
    new columns 2 and 3 keep waiting; by a deep copy of model and SGD when ``copied``), then saved
    and loaded into a fresh model and SGD."""
    model = base()
    plain = base()
    plain.load_state_dict(model.state_dict())
    layer = model[0] = lorambo.LoRAMBoLinear(model[0], rank=2, capacity=4)
    opt = sgd(layer)
    model(x).pow(2).sum().backward()
    opt.step()
    opt.zero_grad()
    layer.lora_B.requires_grad_(False)
    with pytest.warns(UserWarning, match="lora_B is frozen"):
        layer.set_rank(4, optimizer=opt)
    if copied:  # torch's deepcopy of an optimizer drops its state_dict hooks
        model, opt = copy.deepcopy((model, opt))
    model(x).pow(2).sum().backward()
    opt.step()
    opt.zero_grad()

    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    assert all(set(state) == {"momentum_buffer"} for state in opt.state.values())  # live state untouched
    path = lorambo.save_adapter(model, tmp_path / "adapter.safetensors")
    buffer.seek(0)
    resumed = lorambo.load_adapter(plain, path)
    opt = sgd(resumed[0])
    opt.load_state_dict(torch.load(buffer, weights_only=True))
    resumed[0].lora_B.requires_grad_(True)
    return resumed, opt


def first_step(model, opt, x):
    """One step; returns (B's gradient, B's momentum buffer before the step, B after it)."""
    model(x).pow(2).sum().backward()
    B = model[0].lora_B
    grad, buf = B.grad.clone(), opt.state[B]["momentum_buffer"].clone()
    opt.step()
    return grad, buf, B.detach().clone()


@pytest.mark.parametrize("copied", [False, True], ids=["same_sgd", "deep_copied_sgd"])
def test_waiting_slots_start_fresh_after_resume(tmp_path, copied):
    torch.manual_seed(0)
    x = torch.randn(4, 6, dtype=torch.float64)
    model, opt = resumed_with_waiting_slots(tmp_path, x, copied)
    d, _, after = first_step(model, opt, x)
    assert d[:, 2:].abs().min() > 1e-3
    # a fresh SGD's first step of a slot at 0: buf = d, value = -lr * d (before the fix: (1 - dampening) times)
    torch.testing.assert_close(after[:, 2:], -LR * d[:, 2:], rtol=1e-12, atol=1e-15)


def test_waiting_slots_move_with_keep_components_before_the_step(tmp_path):
    torch.manual_seed(1)
    x = torch.randn(4, 6, dtype=torch.float64)
    model, opt = resumed_with_waiting_slots(tmp_path, x)
    before = model[0].lora_B.detach().clone()
    model[0].keep_components([3, 0, 1, 2], optimizer=opt)  # waiting slots 2, 3 -> 3, 0
    d, buf, after = first_step(model, opt, x)
    torch.testing.assert_close(after[:, [0, 3]], -LR * d[:, [0, 3]], rtol=1e-12, atol=1e-15)
    # the trained slots (old 0, 1 -> 1, 2) go on with their momentum: buf' = 0.9 buf + (1 - dampening) d
    expected = before[:, [0, 1]] - LR * (0.9 * buf[:, [1, 2]] + (1 - DAMPENING) * d[:, [1, 2]])
    torch.testing.assert_close(after[:, [1, 2]], expected, rtol=1e-12, atol=1e-15)
