"""A regrown slot starts from a fresh optimizer's state also where that state is not zero
(Rprop's step size, Adagrad's accumulator): its first update is a fresh optimizer's, computed
here in float64 from the optimizers' published update rules."""

import copy
import pickle

import pytest
import torch
from torch import nn

from lorambo import LoRAMBoLinear

DT = torch.float64
LR = 1e-2


def _train(layer, x, opt, steps: int) -> None:
    for _ in range(steps):
        opt.zero_grad()
        layer(x).square().sum().backward()
        opt.step()


def _trained_then_regrown(make_optimizer):
    """(layer, input, optimizer): a layer trained 3 steps at rank 2, shrunk to 1 and grown back
    to 2, with a non-zero B column so that the regrown row 1 of A gets a gradient."""
    gen = torch.Generator().manual_seed(0)
    layer = LoRAMBoLinear(nn.Linear(6, 5, dtype=DT), rank=2, capacity=4)
    with torch.no_grad():
        layer.lora_B[:, :2].copy_(torch.randn(5, 2, dtype=DT, generator=gen))
    x = torch.randn(7, 6, dtype=DT, generator=gen)
    opt = make_optimizer([layer.lora_A, layer.lora_B])
    _train(layer, x, opt, steps=3)
    layer.set_rank(1, optimizer=opt)
    layer.set_rank(2, optimizer=opt, generator=gen)
    with torch.no_grad():
        layer.lora_B[:, 1].copy_(torch.randn(5, dtype=DT, generator=gen))
    return layer, x, opt


def _regrown_first_update(make_optimizer):
    """(A's regrown row after one step - before, the gradient of that row) for a layer trained
    3 steps at rank 2, shrunk to 1 and grown back to 2."""
    layer, x, opt = _trained_then_regrown(make_optimizer)
    opt.zero_grad()
    layer(x).square().sum().backward()
    before, grad = layer.lora_A[1].detach().clone(), layer.lora_A.grad[1].clone()
    opt.step()
    assert grad.abs().min() > 0
    return layer.lora_A[1].detach() - before, grad


def test_rprop_regrown_slot_steps_by_the_learning_rate():
    # fresh Rprop, first step: prev = 0, so the step size stays at lr and the update is -lr * sign(g)
    delta, grad = _regrown_first_update(lambda p: torch.optim.Rprop(p, lr=LR))
    torch.testing.assert_close(delta, -LR * grad.sign(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("start", [0.0, 0.1])
def test_adagrad_regrown_slot_starts_from_initial_accumulator_value(start):
    eps = 1e-10
    delta, grad = _regrown_first_update(
        lambda p: torch.optim.Adagrad(p, lr=LR, initial_accumulator_value=start, eps=eps))
    torch.testing.assert_close(delta, -LR * grad / ((start + grad.square()).sqrt() + eps), rtol=1e-12, atol=0)


def test_fsdp_rank_edits_start_rprop_slots_fresh_too():
    """lorambo.integrations.fsdp edits ranks through a stand-in for the optimizer; it must still
    say which optimizer and which group's lr a slot starts from."""
    from lorambo.integrations import fsdp

    layer = LoRAMBoLinear(nn.Linear(6, 5, dtype=DT), rank=2, capacity=4)
    opt = torch.optim.Rprop([{"params": [layer.lora_A], "lr": LR}, {"params": [layer.lora_B], "lr": 2 * LR}])
    layer.lora_A.grad, layer.lora_B.grad = torch.ones_like(layer.lora_A), torch.ones_like(layer.lora_B)
    opt.step()
    fsdp.set_rank(layer, 1, optimizer=opt)
    fsdp.set_rank(layer, 3, optimizer=opt)
    assert torch.equal(opt.state[layer.lora_A]["step_size"][1:3], torch.full((2, 6), LR, dtype=DT))
    assert torch.equal(opt.state[layer.lora_B]["step_size"][:, 1:3], torch.full((5, 2), 2 * LR, dtype=DT))


@pytest.mark.parametrize("make_optimizer", [lambda p: torch.optim.NAdam(p, lr=LR),
                                            lambda p: torch.optim.ASGD(p, lr=LR),
                                            lambda p: torch.optim.ASGD(p, lr=LR, t0=1.0),
                                            lambda p: torch.optim.Adam(p, lr=LR)],
                         ids=["nadam", "asgd", "asgd-averaging-from-step-1", "adam"])
def test_regrowth_from_rank_zero_trains_as_a_fresh_optimizer(make_optimizer):
    """Every active slot new (rank 0 -> 2): the per-parameter scalars restart with ``step``
    (NAdam's mu_product, ASGD's eta and mu), so three steps match a fresh optimizer of the same
    kind over a copy of the pools fed the same gradients (ASGD's average ``ax`` too)."""
    gen = torch.Generator().manual_seed(0)
    layer = LoRAMBoLinear(nn.Linear(6, 5, dtype=DT), rank=2, capacity=4)
    pools = (layer.lora_A, layer.lora_B)
    x = torch.randn(7, 6, dtype=DT, generator=gen)
    opt = make_optimizer(list(pools))
    _train(layer, x, opt, steps=4)
    layer.set_rank(0, optimizer=opt)
    layer.set_rank(2, optimizer=opt, generator=gen)
    with torch.no_grad():
        layer.lora_B[:, :2].copy_(torch.randn(5, 2, dtype=DT, generator=gen))
    twins = [nn.Parameter(p.detach().clone()) for p in pools]
    fresh = make_optimizer(twins)
    for _ in range(3):
        opt.zero_grad()
        layer(x).square().sum().backward()
        for twin, p in zip(twins, pools):
            twin.grad = p.grad.clone()
        opt.step()
        fresh.step()
        for twin, p in zip(twins, pools):
            torch.testing.assert_close(p.detach(), twin.detach(), rtol=1e-12, atol=1e-15)
            if "ax" in fresh.state[twin]:  # ASGD's average, which mu weighs once step > t0
                torch.testing.assert_close(opt.state[p]["ax"], fresh.state[twin]["ax"], rtol=1e-12, atol=1e-15)


def test_growth_from_rank_zero_does_not_warn_about_the_shared_step():
    """The warning says new slots start at step t of a shared count; growing from rank 0
    restarts that count, so it was a false alarm there (and used up the optimizer's one warning)."""
    import warnings

    layer = LoRAMBoLinear(nn.Linear(6, 5, dtype=DT), rank=2, capacity=4)
    opt = torch.optim.Adam(layer.parameters(), lr=LR)
    layer.lora_A.grad, layer.lora_B.grad = torch.ones_like(layer.lora_A), torch.ones_like(layer.lora_B)
    opt.step()
    layer.set_rank(0, optimizer=opt)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer.set_rank(1, optimizer=opt)
    opt.step()
    with pytest.warns(UserWarning, match="Adam keeps one step count per parameter"):
        layer.set_rank(2, optimizer=opt)


def test_shared_step_warning_names_the_step_the_new_slots_take_first():
    """After 3 Adam steps a grown slot's first update is Adam's step 4 (the count torch holds
    after it), not step 3, which the warning used to name."""
    layer = LoRAMBoLinear(nn.Linear(6, 5, dtype=DT), rank=2, capacity=4)
    opt = torch.optim.Adam(layer.parameters(), lr=LR)
    for _ in range(3):
        layer.lora_A.grad, layer.lora_B.grad = torch.ones_like(layer.lora_A), torch.ones_like(layer.lora_B)
        opt.step()
    with pytest.warns(UserWarning, match=r"take their first step at step 4 of it, not at step 1"):
        layer.set_rank(3, optimizer=opt)
    opt.step()
    assert float(opt.state[layer.lora_A]["step"]) == 4


def _regrown_row_against_fresh(make_optimizer, steps: int = 3, reload: str | None = None) -> None:
    """A layer trained 3 steps at rank 2, shrunk to 1 and grown back to 2: row 1 of
    A (regrown) follows, step for step, a fresh optimizer of the same kind over a copy of that
    row fed the same gradients (per-element optimizers: a row depends on its own state only).
    ``reload``, between the rank change and the step: "state_dict" rebuilds the optimizer from
    its state_dict; "deepcopy" / "pickle" train a copy of the layer and its optimizer instead."""
    layer, x, opt = _trained_then_regrown(make_optimizer)
    if reload == "state_dict":
        saved, opt = opt.state_dict(), make_optimizer([layer.lora_A, layer.lora_B])
        opt.load_state_dict(saved)
    elif reload == "deepcopy":
        layer, opt = copy.deepcopy((layer, opt))
    elif reload == "pickle":
        layer, opt = pickle.loads(pickle.dumps((layer, opt)))
    twin = nn.Parameter(layer.lora_A[1:2].detach().clone())
    fresh = make_optimizer([twin])
    for _ in range(steps):
        opt.zero_grad()
        layer(x).square().sum().backward()
        assert layer.lora_A.grad[1].abs().min() > 0
        twin.grad = layer.lora_A.grad[1:2].clone()
        opt.step()
        fresh.step()
        torch.testing.assert_close(layer.lora_A[1:2].detach(), twin.detach(), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("kwargs", [dict(momentum=0.9, dampening=0.5),
                                    dict(momentum=0.9, dampening=1.0, weight_decay=0.1),
                                    dict(momentum=0.5, dampening=0.3, maximize=True, foreach=True),
                                    dict(momentum=0.9, dampening=0.5, fused=True),
                                    dict(momentum=0.9, nesterov=True, weight_decay=0.1)],
                         ids=["dampening", "dampening1-wd", "maximize-foreach", "fused", "nesterov"])
@pytest.mark.parametrize("reload", [None, "state_dict", "deepcopy", "pickle"],
                         ids=["kept", "reloaded", "deepcopied", "pickled"])
def test_sgd_momentum_regrown_slot_starts_its_buffer_at_the_gradient(kwargs, reload):
    """A fresh SGD's first momentum buffer is the update direction itself, not (1 - dampening)
    times it, which is what a zeroed buffer gives; also after a state_dict round trip, and in a
    deep copy or pickle of the layer and its optimizer (whose first step was (1 - dampening) d)."""
    _regrown_row_against_fresh(lambda p: torch.optim.SGD(p, lr=LR, **kwargs), reload=reload)


@pytest.mark.parametrize("overflow", [False, True], ids=["finite", "overflow-first"])
def test_sgd_regrown_slot_starts_fresh_under_a_grad_scaler_with_fused_sgd(overflow):
    """A GradScaler steps a fused SGD with the gradients still scaled (the kernel unscales them):
    the new slot's buffer was set from the scaled gradient, 2^12 times a fresh SGD's (the row
    ended 270 off), and a step the scaler skipped for an overflow set it from the inf gradient
    (NaN from then on)."""
    kwargs = dict(lr=LR, momentum=0.9, dampening=0.5, weight_decay=0.1)
    layer, x, opt = _trained_then_regrown(lambda p: torch.optim.SGD(p, fused=True, **kwargs))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    twin = nn.Parameter(layer.lora_A[1:2].detach().clone())
    fresh = torch.optim.SGD([twin], **kwargs)
    for step in range(3):
        opt.zero_grad()
        loss = layer(x).square().sum()
        skipped = overflow and step == 0
        scaler.scale(loss * (float("inf") if skipped else 1.0)).backward()
        twin.grad = layer.lora_A.grad[1:2] / scaler.get_scale()
        scaler.step(opt)
        if not skipped:
            assert twin.grad.abs().min() > 0
            fresh.step()
        scaler.update()
        torch.testing.assert_close(layer.lora_A[1:2].detach(), twin.detach(), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("many", [False, True], ids=["keep_components", "keep_components_many"])
def test_sgd_regrown_slot_moved_before_its_first_step_starts_fresh_too(many):
    """The record of a new slot moves with it (keep_components) and is dropped with it."""
    from lorambo.nn import keep_components_many

    gen = torch.Generator().manual_seed(1)
    layer = LoRAMBoLinear(nn.Linear(6, 5, dtype=DT), rank=3, capacity=4)
    with torch.no_grad():
        layer.lora_B[:, :3].copy_(torch.randn(5, 3, dtype=DT, generator=gen))
    x = torch.randn(7, 6, dtype=DT, generator=gen)
    opt = torch.optim.SGD([layer.lora_A, layer.lora_B], lr=LR, momentum=0.9, dampening=0.5)
    _train(layer, x, opt, steps=2)
    layer.set_rank(2, optimizer=opt)
    layer.set_rank(3, optimizer=opt, generator=gen)  # slot 2 new
    if many:  # the compiled pool remap where the extension is built
        keep_components_many([(layer, [2, 0])], opt)
    else:
        layer.keep_components([2, 0], optimizer=opt)  # new slot 2 -> 0, old slot 0 -> 1
    with torch.no_grad():
        layer.lora_B[:, 0].copy_(torch.randn(5, dtype=DT, generator=gen))
    old_buf = opt.state[layer.lora_A]["momentum_buffer"][1].clone()
    opt.zero_grad()
    layer(x).square().sum().backward()
    grad, before = layer.lora_A.grad.clone(), layer.lora_A.detach().clone()
    opt.step()
    torch.testing.assert_close(layer.lora_A[0] - before[0], -LR * grad[0], rtol=1e-12, atol=0)
    torch.testing.assert_close(layer.lora_A[1] - before[1], -LR * (0.9 * old_buf + 0.5 * grad[1]),
                               rtol=1e-12, atol=0)


@pytest.mark.parametrize("make_optimizer, warns", [
    (lambda p: torch.optim.Adagrad(p, lr=LR, lr_decay=0.1), True),
    (lambda p: torch.optim.ASGD(p, lr=LR), True),
    (lambda p: torch.optim.Adagrad(p, lr=LR), False),
    (lambda p: torch.optim.RMSprop(p, lr=LR, centered=True), False),
], ids=["adagrad-lr_decay", "asgd", "adagrad", "rmsprop"])
def test_shared_step_that_sets_the_update_is_warned_about_beyond_adam(make_optimizer, warns):
    """Adagrad's lr_decay and ASGD's eta / mu follow the one step count of the parameter, so a
    regrown slot is not updated as under a fresh optimizer (off by 1e-2 after a few steps with
    lr_decay=0.1): warned about like Adam's bias correction; optimizers whose step sets nothing
    stay silent."""
    import warnings

    layer = LoRAMBoLinear(nn.Linear(6, 5, dtype=DT), rank=2, capacity=4)
    opt = make_optimizer([layer.lora_A, layer.lora_B])
    _train(layer, torch.randn(7, 6, dtype=DT), opt, steps=2)
    layer.set_rank(1, optimizer=opt)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layer.set_rank(2, optimizer=opt)
    name = type(opt).__name__
    assert [str(w.message).startswith(f"{name} keeps one step count per parameter") for w in caught] == \
        ([True] if warns else [])


def test_growth_from_rank_one_keeps_the_trained_slots_adam_step():
    """Only growth from rank 0 makes every active slot new; from rank 1, slot 0 goes on with its
    moments, so torch Adam's shared ``step`` (its bias correction) must go on too: its next
    update is that of an uninterrupted Adam over a copy of slot 0 (float64)."""
    gen = torch.Generator().manual_seed(0)
    layer = LoRAMBoLinear(nn.Linear(6, 5, dtype=DT), rank=1, capacity=4)
    with torch.no_grad():
        layer.lora_B[:, :1].copy_(torch.randn(5, 1, dtype=DT, generator=gen))
    x = torch.randn(7, 6, dtype=DT, generator=gen)
    opt = torch.optim.Adam([layer.lora_A, layer.lora_B], lr=LR)
    twin = nn.Parameter(layer.lora_A[0].detach().clone())
    fresh = torch.optim.Adam([twin], lr=LR)
    for step in range(4):
        if step == 3:
            with pytest.warns(UserWarning, match="Adam keeps one step count per parameter"):
                layer.set_rank(2, optimizer=opt, generator=gen)
        opt.zero_grad()
        layer(x).square().sum().backward()
        twin.grad = layer.lora_A.grad[0].clone()
        opt.step()
        fresh.step()
    assert float(opt.state[layer.lora_A]["step"]) == 4.0
    torch.testing.assert_close(layer.lora_A[0].detach(), twin.detach(), rtol=1e-12, atol=1e-15)
