"""lorambo.optim.AdamW: torch's AdamW for plain parameters, per-slot Adam for rank pools."""

import copy
import warnings

import pytest
import torch

import lorambo
from lorambo import LoRAMBoLinear
from lorambo.optim import AdamW


def _pool_layer(rank=2, capacity=8, din=10, dout=9, dtype=torch.float64):
    return LoRAMBoLinear(torch.nn.Linear(din, dout, dtype=dtype), rank=rank, capacity=capacity)


def _random_active_grads(layer):
    """Fresh random gradients on the active slots (inactive slots get exactly zero, as the op gives)."""
    r = layer.rank
    for param, dim in ((layer.lora_A, 0), (layer.lora_B, 1)):
        grad = torch.zeros_like(param)
        grad.narrow(dim, 0, r).copy_(torch.randn_like(grad.narrow(dim, 0, r)))
        param.grad = grad


@pytest.mark.parametrize("options", [dict(), dict(amsgrad=True), dict(maximize=True, weight_decay=0.1),
                                     dict(foreach=False), dict(foreach=True, betas=(0.8, 0.99))])
def test_plain_parameters_follow_torch_adamw_exactly(options):
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    twin = copy.deepcopy(model)
    ours, theirs = AdamW(model.parameters(), lr=3e-2, **options), torch.optim.AdamW(twin.parameters(), lr=3e-2, **options)
    for _ in range(5):
        x = torch.randn(4, 6)
        for net, opt in ((model, ours), (twin, theirs)):
            opt.zero_grad()
            net(x).square().sum().backward()
            opt.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


@pytest.mark.parametrize("dim_name", ["lora_A", "lora_B"])
def test_slot_activated_at_step_1000_moves_like_a_fresh_adam(dim_name):
    layer = _pool_layer(rank=2)
    kwargs = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    opt = AdamW(layer.parameters(), **kwargs)
    for _ in range(1000):
        _random_active_grads(layer)
        opt.step()
    layer.set_rank(3, optimizer=opt)
    slot, dim = 2, (0 if dim_name == "lora_A" else 1)
    pool = getattr(layer, dim_name)
    # The oracle: torch's own AdamW, fresh, on a standalone copy of the new slot.
    fresh = torch.nn.Parameter(pool.detach().select(dim, slot).clone())
    if dim_name == "lora_A":  # B = 0 at activation: give the oracle a non-zero start for A only
        assert fresh.abs().sum() > 0
    oracle = torch.optim.AdamW([fresh], **kwargs)
    for _ in range(20):
        _random_active_grads(layer)
        before = pool.detach().select(dim, slot).clone()
        fresh.grad = pool.grad.select(dim, slot).clone()
        opt.step()
        oracle.step()
        ours = pool.detach().select(dim, slot) - before
        torch.testing.assert_close(pool.detach().select(dim, slot), fresh.detach(), rtol=1e-6, atol=1e-12)
        assert ours.abs().max() > 0
    assert opt.state[pool]["slot_step"].tolist()[:3] == [1020.0, 1020.0, 20.0]


def test_torch_adamw_gives_a_late_slot_oversized_first_steps_and_warns_once():
    """Why lorambo.optim.AdamW exists: the same schedule under torch.optim.AdamW."""
    layer = _pool_layer(rank=2)
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(1000):
        _random_active_grads(layer)
        opt.step()
    with pytest.warns(UserWarning, match="lorambo.optim.AdamW"):
        layer.set_rank(3, optimizer=opt)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer.set_rank(4, optimizer=opt)  # once per optimizer
    _random_active_grads(layer)
    before = layer.lora_B.detach()[:, 2].clone()
    opt.step()
    step = (layer.lora_B.detach()[:, 2] - before).abs()
    # A fresh Adam's first step is lr * |g| / (|g| + eps) ~ lr per element; torch's is far larger.
    assert step.mean() > 2.5 * 1e-2


def test_slot_steps_survive_a_state_dict_round_trip_in_bfloat16():
    layer = _pool_layer(rank=2, dtype=torch.bfloat16)
    opt = AdamW(layer.parameters(), lr=1e-3)
    for _ in range(300):
        _random_active_grads(layer)
        opt.step()
    state = copy.deepcopy(opt.state_dict())
    other = AdamW(layer.parameters(), lr=1e-3)
    other.load_state_dict(state)
    counts = other.state[layer.lora_A]["slot_step"]
    assert counts.dtype == torch.float32 and counts.tolist()[:3] == [300.0, 300.0, 0.0]
    assert other.state[layer.lora_A]["exp_avg"].dtype == torch.bfloat16


@pytest.mark.parametrize("saved_with", [AdamW, torch.optim.AdamW])
def test_state_of_pools_with_another_capacity_is_refused_at_load(saved_with):
    """State saved for capacity-8 pools loaded into capacity-16 pools (a model rebuilt with other
    capacities, the adapter loaded by load_adapter): the load went through and the first step
    failed inside the update with a message naming no parameter (the extension's 'slot_steps[0]
    ... got Float [8]', or torch's 'size of tensor a (8) must match')."""
    small, big = _pool_layer(rank=3, capacity=8), _pool_layer(rank=3, capacity=9)
    first = saved_with(small.parameters(), lr=1e-2)
    _random_active_grads(small)
    first.step()
    saved = copy.deepcopy(first.state_dict())
    opt = AdamW(big.parameters(), lr=1e-2)
    with pytest.raises(ValueError, match=r"parameter 0 of param group 0 .*'exp_avg' of shape \[8, 10\].*\[9, 10\]"):
        opt.load_state_dict(saved)
    assert not opt.state  # refused before anything was loaded


@pytest.mark.parametrize("options", [dict(), dict(amsgrad=True, weight_decay=0.1)])
def test_resuming_from_a_torch_adamw_checkpoint_keeps_its_moments(options):
    # switching a run from torch.optim.AdamW to lorambo's (as the shared-step warning suggests):
    # the loaded moments and step count must carry on, as torch's AdamW would continue them
    # (they were silently replaced by zeros and step 0)
    torch.manual_seed(5)
    layer = _pool_layer(rank=3)
    first = torch.optim.AdamW(layer.parameters(), lr=1e-2, **options)
    for _ in range(4):
        _random_active_grads(layer)
        first.step()
    saved = copy.deepcopy(first.state_dict())
    ours_layer, torch_layer = copy.deepcopy(layer), copy.deepcopy(layer)
    ours = AdamW(ours_layer.parameters(), lr=1e-2, **options)
    ours.load_state_dict(copy.deepcopy(saved))  # torch aliases the loaded tensors
    theirs = torch.optim.AdamW(torch_layer.parameters(), lr=1e-2, **options)
    theirs.load_state_dict(saved)
    for _ in range(3):
        _random_active_grads(torch_layer)
        for p, q in ((ours_layer.lora_A, torch_layer.lora_A), (ours_layer.lora_B, torch_layer.lora_B)):
            p.grad = q.grad.clone()
        ours.step()
        theirs.step()
    for p, q in ((ours_layer.lora_A, torch_layer.lora_A), (ours_layer.lora_B, torch_layer.lora_B)):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ours.state[p]["exp_avg"], theirs.state[q]["exp_avg"], rtol=1e-12, atol=1e-12)
    assert ours.state[ours_layer.lora_A]["slot_step"].tolist() == [7, 7, 7, 0, 0, 0, 0, 0]


def test_only_active_slots_are_touched_and_deepcopied_layers_stay_pools():
    layer = _pool_layer(rank=3)
    clone = copy.deepcopy(layer)
    opt = AdamW(clone.parameters(), lr=1e-2)
    _random_active_grads(clone)
    clone.lora_A.grad[5] = 1.0  # a stray gradient in an inactive slot must not move it
    opt.step()
    assert torch.count_nonzero(clone.lora_A[3:]) == 0 and torch.count_nonzero(clone.lora_B[:, 3:]) == 0
    assert "slot_step" in opt.state[clone.lora_A]
    assert opt.state[clone.lora_A]["slot_step"].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]


def test_differentiable_is_refused():
    with pytest.raises(ValueError, match="differentiable"):
        AdamW([torch.nn.Parameter(torch.zeros(2))], differentiable=True)


def _replaced_by_load_state_dict_assign(layer):
    layer.load_state_dict({k: v.clone() for k, v in layer.state_dict().items()}, assign=True)


def _replaced_by_a_conversion_not_in_place(layer):
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        layer.double()
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(False)


def _replaced_by_setattr(layer):
    layer.lora_A = torch.nn.Parameter(layer.lora_A.detach().clone())
    layer.lora_B = torch.nn.Parameter(layer.lora_B.detach().clone())


@pytest.mark.parametrize("replace", [_replaced_by_load_state_dict_assign, _replaced_by_a_conversion_not_in_place,
                                     _replaced_by_setattr])
def test_pools_replaced_by_new_parameter_objects_stay_pools(replace):
    layer = _pool_layer(rank=3)
    old = (layer.lora_A, layer.lora_B)
    replace(layer)
    assert layer.lora_A is not old[0] and layer.lora_B is not old[1]  # the case this test is about
    opt = AdamW(layer.parameters(), lr=1e-2)
    _random_active_grads(layer)
    layer.lora_A.grad[5] = 1.0  # an inactive slot: a plain AdamW would move it
    opt.step()
    assert torch.count_nonzero(layer.lora_A[3:]) == 0
    assert opt.state[layer.lora_A]["slot_step"].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]
    assert opt.state[layer.lora_B]["slot_step"].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]
    layer.set_rank(4, optimizer=opt)  # the layer's rank changes reach the new objects' tags
    _random_active_grads(layer)
    opt.step()
    assert opt.state[layer.lora_A]["slot_step"].tolist() == [2, 2, 2, 1, 0, 0, 0, 0]


@pytest.mark.parametrize("eps", [1e-8, 0.5])
def test_a_warm_up_from_lr_zero_steps_like_torch_adamw(eps):
    """lr = 0 is the first step of a linear warm-up (and torch.distributed.checkpoint initialises
    optimizer state with it): nothing may move and nothing may break, and afterwards a pool whose
    slots are all active trains exactly like torch's AdamW."""
    torch.manual_seed(4)
    layer = _pool_layer(rank=4, capacity=4)
    layer.lora_B.data.normal_()  # both pools get gradients from the first step
    twin = copy.deepcopy(layer)
    kwargs = dict(lr=1e-2, weight_decay=0.1, eps=eps)
    ours, theirs = AdamW(layer.parameters(), **kwargs), torch.optim.AdamW(twin.parameters(), **kwargs)
    warm_up = lambda step: min(step / 3, 1.0)  # noqa: E731
    schedules = [torch.optim.lr_scheduler.LambdaLR(opt, warm_up) for opt in (ours, theirs)]
    start = layer.lora_A.detach().clone()
    for step in range(6):
        x = torch.randn(5, 10, dtype=torch.float64)
        for net, opt, schedule in ((layer, ours, schedules[0]), (twin, theirs, schedules[1])):
            opt.zero_grad()
            net(x).square().sum().backward()
            opt.step()
            schedule.step()
        if step == 0:
            assert torch.equal(layer.lora_A, start)
    for name in ("lora_A", "lora_B"):
        torch.testing.assert_close(getattr(layer, name), getattr(twin, name), rtol=1e-12, atol=1e-14)
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(ours.state[getattr(layer, name)][key], theirs.state[getattr(twin, name)][key],
                                       rtol=1e-12, atol=1e-16)


@pytest.mark.parametrize("fused", [False, True])
def test_grad_scaler_unscales_and_skips_overflow_steps_for_pools(fused):
    """torch's fused AdamW takes the GradScaler's scale into its kernel; the pool update must not
    see scaled gradients, and a step whose gradients overflowed must leave the pools untouched."""
    torch.manual_seed(0)
    layer = LoRAMBoLinear(torch.nn.Linear(10, 9), rank=3, capacity=4)
    layer.lora_B.data.normal_()
    twin = copy.deepcopy(layer)
    ours = AdamW(layer.parameters(), lr=1e-2, eps=1e-3, fused=fused)
    reference = AdamW(twin.parameters(), lr=1e-2, eps=1e-3)  # unscaled, no GradScaler
    scaler = torch.amp.GradScaler("cpu", init_scale=1e38)  # the first scaled gradients overflow
    x = torch.randn(5, 10)
    before = [p.detach().clone() for p in layer.parameters()]
    scaler.scale(layer(x).square().sum()).backward()
    scaler.step(ours)
    scaler.update()
    assert all(torch.equal(p, q) for p, q in zip(layer.parameters(), before))  # skipped, not NaN
    assert "slot_step" not in ours.state.get(layer.lora_A, {})
    scaler.update(new_scale=1024.0)
    for _ in range(3):
        x = torch.randn(5, 10)
        ours.zero_grad()
        reference.zero_grad()
        scaler.scale(layer(x).square().sum()).backward()
        scaler.step(ours)
        scaler.update()
        twin(x).square().sum().backward()
        reference.step()
    for name in ("lora_A", "lora_B"):  # eps 1e-3 would act 1024x weaker on scaled gradients
        torch.testing.assert_close(getattr(layer, name), getattr(twin, name), rtol=1e-5, atol=1e-6)


def test_step_with_a_closure_evaluates_it_and_returns_its_loss():
    """``step(closure)`` as torch's optimizers take it (LBFGS-style loops, accelerate): the closure
    computes the gradients of this step, and its loss is returned. Reference: torch's AdamW on a
    float64 twin stepped with the same closure."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(_pool_layer(rank=3, capacity=4, din=6, dout=5), torch.nn.Tanh(),
                                torch.nn.Linear(5, 2, dtype=torch.float64))
    with torch.no_grad():
        model[0].lora_B[:, :3].normal_()
    twin = copy.deepcopy(model)
    x = torch.randn(7, 6, dtype=torch.float64)
    kwargs = dict(lr=1e-2, weight_decay=0.1)
    ours, theirs = AdamW(model.parameters(), **kwargs), torch.optim.AdamW(twin.parameters(), **kwargs)
    for _ in range(3):
        losses = []
        for net, opt in ((model, ours), (twin, theirs)):
            def closure(net=net, opt=opt):
                opt.zero_grad()
                loss = net(x).square().sum()
                loss.backward()
                return loss
            losses.append(opt.step(closure))
        assert losses[0] is not None and losses[0].item() == pytest.approx(losses[1].item(), rel=1e-12)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_saved_slot_steps_of_another_length_are_refused_at_load():
    """Moments of the pool's shape with per-slot counts of another length (a state_dict edited or
    assembled by hand): refused at load, naming the key, not at the first step."""
    layer = _pool_layer(rank=3, capacity=8)
    first = AdamW(layer.parameters(), lr=1e-2)
    _random_active_grads(layer)
    first.step()
    saved = copy.deepcopy(first.state_dict())
    saved["state"][1]["slot_step"] = torch.ones(5)
    opt = AdamW(layer.parameters(), lr=1e-2)
    with pytest.raises(ValueError, match=r"parameter 1 of param group 0 .*'slot_step' of shape \[5\].*\[8\]"):
        opt.load_state_dict(saved)
    assert not opt.state


@pytest.mark.parametrize("other", [lambda ps: torch.optim.Adamax(ps, lr=1e-2),
                                   lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9)],
                         ids=["adamax", "sgd-momentum"])
def test_another_optimizers_state_is_refused_at_load(other):
    """Adamax saves step and exp_avg but no exp_avg_sq: taken as Adam's, the pools would step
    with Adamax's late step count and a second moment starting at zero (updates ~30x too large at
    beta2 = 0.999). Refused at load, naming what is missing, with nothing loaded."""
    layer = _pool_layer(rank=3, capacity=8)
    first = other(list(layer.parameters()))
    _random_active_grads(layer)
    first.step()
    opt = AdamW(layer.parameters(), lr=1e-2)
    with pytest.raises(ValueError, match=r"AdamW.load_state_dict: parameter \d of param group 0 has saved state "
                                         r".*lacks Adam's \[.*'exp_avg_sq'\].*another optimizer"):
        opt.load_state_dict(copy.deepcopy(first.state_dict()))
    assert not opt.state
