"""A slot grown under SGD with dampening whose pool gets no gradient for a while (lora_B frozen
for a phase) waits for its first step across step boundaries; a checkpoint taken then
(save_adapter + optimizer.state_dict(), loaded into a fresh model and a fresh SGD) must still
start its momentum buffer as a fresh SGD does: buf = d, so the first step from 0 is -lr * d.
Found by tests/nn/test_pool_state_machine.py: the resumed run took -lr * (1 - dampening) * d."""

import copy
import io
import pickle

import pytest
import torch
from torch import nn

import lorambo

LR, DAMPENING = 0.1, 0.5


def sgd(layer):
    return torch.optim.SGD([layer.lora_A, layer.lora_B], lr=LR, momentum=0.9, dampening=DAMPENING)


def base():
    return nn.Sequential(nn.Linear(6, 5)).double()


def resumed_with_waiting_slots(tmp_path, x, copied=None, loader_stepped=False):
    """A rank-2 layer trained one step, grown to 4 while lora_B is frozen, stepped once more (B's
    new columns 2 and 3 keep waiting), then saved and loaded into a fresh model and SGD.
    ``copied``: "before_step" steps and saves a deep copy of model and SGD taken after the rank
    change; "deepcopy" / "pickle" / "rebuilt" save a copy of both taken after that step (the
    SGD rebuilt from its state_dict), which has not stepped itself. ``loader_stepped``: the SGD
    that loads has stepped before (without gradients: nothing moves) and loads twice."""
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
    if copied == "before_step":
        model, opt = copy.deepcopy((model, opt))
    model(x).pow(2).sum().backward()
    opt.step()
    opt.zero_grad()
    if copied == "deepcopy":
        model, opt = copy.deepcopy((model, opt))
    elif copied == "pickle":
        model, opt = pickle.loads(pickle.dumps((model, opt)))
    elif copied == "rebuilt":
        saved, opt = opt.state_dict(), sgd(layer)
        opt.load_state_dict(saved)

    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    path = lorambo.save_adapter(model, tmp_path / "adapter.safetensors")
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = lorambo.load_adapter(plain, path)
    opt = sgd(resumed[0])
    if loader_stepped:
        opt.step()
        opt.load_state_dict(saved)
    opt.load_state_dict(saved)
    resumed[0].lora_B.requires_grad_(True)
    return resumed, opt


def first_step(model, opt, x):
    """One step; returns (B's gradient, B's momentum buffer before the step, B after it)."""
    model(x).pow(2).sum().backward()
    B = model[0].lora_B
    grad, buf = B.grad.clone(), opt.state[B]["momentum_buffer"].clone()
    opt.step()
    return grad, buf, B.detach().clone()


@pytest.mark.parametrize("copied", [None, "before_step", "deepcopy", "pickle", "rebuilt"],
                         ids=["same_sgd", "deep_copied_sgd", "unstepped_deep_copy", "unstepped_unpickled",
                              "unstepped_rebuilt"])
@pytest.mark.parametrize("loader_stepped", [False, True], ids=["fresh_loader", "stepped_loader"])
def test_waiting_slots_start_fresh_after_resume(tmp_path, copied, loader_stepped):
    torch.manual_seed(0)
    x = torch.randn(4, 6, dtype=torch.float64)
    model, opt = resumed_with_waiting_slots(tmp_path, x, copied, loader_stepped)
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


def test_waiting_slots_start_fresh_through_distributed_checkpoint_state_dicts():
    """A rank change just before a checkpoint (LoRAMBoCallback decides at a step's end, then
    Trainer saves) through torch.distributed.checkpoint's get/set_optimizer_state_dict into a
    fresh model and SGD: the new slots start as under a fresh SGD. The flattened form takes the
    record too (it refuses lists)."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                         set_optimizer_state_dict)

    torch.manual_seed(2)
    x = torch.randn(4, 6, dtype=torch.float64)
    model = base()
    model[0] = lorambo.LoRAMBoLinear(model[0], rank=2, capacity=4)
    with torch.no_grad():
        model[0].lora_B[:, :2].normal_()
    opt = sgd(model[0])
    model(x).pow(2).sum().backward()
    opt.step()
    opt.zero_grad()
    model[0].set_rank(3, optimizer=opt)  # A's new row 2 waits for its first step
    with torch.no_grad():
        model[0].lora_B[:, 2].normal_()  # so that it gets a gradient
    flat = get_optimizer_state_dict(model, opt, options=StateDictOptions(flatten_optimizer_state_dict=True))
    assert flat["state.0.lora_A.lorambo_new_slots"] == 1 << 2
    saved = get_optimizer_state_dict(model, opt)
    resumed = copy.deepcopy(model)
    opt = sgd(resumed[0])
    set_optimizer_state_dict(resumed, opt, saved)
    resumed(x).pow(2).sum().backward()
    A = resumed[0].lora_A
    d, before = A.grad[2].clone(), A[2].detach().clone()
    assert d.abs().min() > 1e-3
    opt.step()
    torch.testing.assert_close(A[2] - before, -LR * d, rtol=1e-12, atol=1e-15)


def test_waiting_slots_start_fresh_when_the_same_sgd_steps_them_after_a_frozen_phase():
    """No resume: the SGD that stepped while lora_B was frozen (no gradient, its new columns
    waiting) steps them once lora_B trains again; they start as under a fresh SGD."""
    torch.manual_seed(3)
    x = torch.randn(4, 6, dtype=torch.float64)
    model = base()
    layer = model[0] = lorambo.LoRAMBoLinear(model[0], rank=2, capacity=4)
    opt = sgd(layer)
    model(x).pow(2).sum().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    layer.lora_B.requires_grad_(False)
    with pytest.warns(UserWarning, match="lora_B is frozen"):
        layer.set_rank(4, optimizer=opt)
    for _ in range(2):  # steps of A alone: B's new columns 2 and 3 keep waiting
        model(x).pow(2).sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    layer.lora_B.requires_grad_(True)
    d, _, after = first_step(model, opt, x)
    assert d[:, 2:].abs().min() > 1e-3
    torch.testing.assert_close(after[:, 2:], -LR * d[:, 2:], rtol=1e-12, atol=1e-15)
