"""Rank changes given accelerate's ``AcceleratedOptimizer`` (what ``accelerator.prepare`` returns)
or torch's ``ZeroRedundancyOptimizer`` edit the optimizer it wraps as if given that optimizer:
regrown slots start from a fresh optimizer's state (checked in float64 against the optimizers'
published first-step rules), state moves with kept slots, and no StaleOptimizerStateWarning
claims the optimizer was left behind."""

import warnings

import pytest
import torch
from torch import nn

from lorambo import LoRAMBoLinear, configure_model, reset_slot_state
from lorambo.nn import StaleOptimizerStateWarning, keep_components_many

DT = torch.float64
LR = 1e-2


def _accelerated(optimizer):
    from accelerate.optimizer import AcceleratedOptimizer

    return AcceleratedOptimizer(optimizer, device_placement=False)


def _trained(make_optimizer, steps=3):
    """(layer, input, wrapped optimizer): a rank-2 layer with non-zero B trained ``steps`` steps."""
    gen = torch.Generator().manual_seed(0)
    layer = LoRAMBoLinear(nn.Linear(6, 5, dtype=DT), rank=2, capacity=4)
    with torch.no_grad():
        layer.lora_B[:, :2].copy_(torch.randn(5, 2, dtype=DT, generator=gen))
    x = torch.randn(7, 6, dtype=DT, generator=gen)
    opt = _accelerated(make_optimizer([layer.lora_A, layer.lora_B]))
    for _ in range(steps):
        opt.zero_grad()
        layer(x).square().sum().backward()
        opt.step()
    return layer, x, opt


def _regrown_row_step(layer, x, opt, gen):
    """(update, gradient, value before) of lora_A's row 1, regrown at rank 2, over one optimizer
    step; B's column 1 is drawn from ``gen`` first so that the row gets a non-zero gradient."""
    with torch.no_grad():
        layer.lora_B[:, 1].copy_(torch.randn(5, dtype=DT, generator=gen))
    opt.zero_grad()
    layer(x).square().sum().backward()
    before, grad = layer.lora_A[1].detach().clone(), layer.lora_A.grad[1].clone()
    assert grad.abs().min() > 0
    opt.step()
    return layer.lora_A[1].detach() - before, grad, before


FRESH_FIRST_UPDATE = {  # -(first update of a fresh optimizer) for gradient g at value p
    "rprop": (lambda p: torch.optim.Rprop(p, lr=LR), lambda g, p: LR * g.sign()),
    "adagrad": (lambda p: torch.optim.Adagrad(p, lr=LR, initial_accumulator_value=0.1, eps=1e-10),
                lambda g, p: LR * g / ((0.1 + g.square()).sqrt() + 1e-10)),
    "sgd_dampening": (lambda p: torch.optim.SGD(p, lr=LR, momentum=0.9, dampening=0.5, weight_decay=0.1),
                      lambda g, p: LR * (g + 0.1 * p)),
}


@pytest.mark.usefixtures("accelerator")
@pytest.mark.parametrize("kind", list(FRESH_FIRST_UPDATE))
def test_regrown_slot_starts_fresh_through_the_wrapper(kind):
    make_optimizer, first_update = FRESH_FIRST_UPDATE[kind]
    layer, x, opt = _trained(make_optimizer)
    gen = torch.Generator().manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", StaleOptimizerStateWarning)
        layer.set_rank(1, optimizer=opt)
        layer.set_rank(2, optimizer=opt, generator=gen)
    update, grad, before = _regrown_row_step(layer, x, opt, gen)
    torch.testing.assert_close(update, -first_update(grad, before), rtol=1e-12, atol=0)


CHANGES = {
    "keep_components": lambda layer, opt: layer.keep_components([1, 0], optimizer=opt),
    "keep_components_many": lambda layer, opt: keep_components_many([(layer, [1, 0])], opt),
    "configure_model": lambda layer, opt: configure_model(nn.Sequential(layer), {"0": 1}, optimizer=opt),
    "reset_slot_state": lambda layer, opt: reset_slot_state(opt, layer, [1]),
}
EXPECTED_BUFFER = {  # the momentum buffer of lora_B after each change, from the one before
    "keep_components": lambda buf: buf[:, [1, 0, 2, 3]],
    "keep_components_many": lambda buf: buf[:, [1, 0, 2, 3]],
    "configure_model": lambda buf: torch.cat([buf[:, :1], torch.zeros(5, 3, dtype=DT)], 1),
    "reset_slot_state": lambda buf: torch.cat([buf[:, :1], torch.zeros(5, 1, dtype=DT), buf[:, 2:]], 1),
}


@pytest.mark.usefixtures("accelerator")
@pytest.mark.parametrize("change", list(CHANGES))
def test_state_of_the_wrapped_optimizer_follows_the_slots(change):
    layer, _, opt = _trained(lambda p: torch.optim.SGD(p, lr=LR, momentum=0.9))
    buf = opt.optimizer.state[layer.lora_B]["momentum_buffer"]
    want = EXPECTED_BUFFER[change](buf.clone())
    assert buf[:, :2].abs().min() > 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", StaleOptimizerStateWarning)
        CHANGES[change](layer, opt)
    assert torch.equal(buf, want)


def test_something_that_is_not_an_optimizer_is_refused_naming_the_call():
    layer = LoRAMBoLinear(nn.Linear(6, 5), rank=2, capacity=4, name="fc")
    opt = torch.optim.SGD(layer.parameters(), lr=LR)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1)
    with pytest.raises(TypeError,
                       match=r"LoRAMBoLinear 'fc'\.set_rank: optimizer must be a torch optimizer .* got StepLR"):
        layer.set_rank(3, optimizer=scheduler)
    assert layer.rank == 2
    with pytest.raises(TypeError, match="keep_components_many: optimizer must be a torch optimizer .* got StepLR"):
        keep_components_many([(layer, [1, 0])], scheduler)
    assert torch.equal(layer.lora_A[2:], torch.zeros(2, 6)) and layer.rank == 2


@pytest.mark.usefixtures("one_process_group")
def test_rank_changes_given_a_zero_redundancy_optimizer_edit_the_optimizer_it_holds():
    """ZeroRedundancyOptimizer keeps the optimizer that holds the state as ``.optim``, its own
    ``state`` is empty: given it, a shrink left the dropped slot's moments in place (Adam moved
    the slot 2.5e-2 off zero in one step, with a warning that the optimizer was left behind)."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    from lorambo.optim import AdamW

    gen = torch.Generator().manual_seed(0)
    layer = LoRAMBoLinear(nn.Linear(6, 5, dtype=DT), rank=2, capacity=4)
    with torch.no_grad():
        layer.lora_B[:, :2].copy_(torch.randn(5, 2, dtype=DT, generator=gen))
    x = torch.randn(7, 6, dtype=DT, generator=gen)
    opt = ZeroRedundancyOptimizer([layer.lora_A, layer.lora_B], optimizer_class=AdamW, lr=LR, weight_decay=0.0)

    def step():
        opt.zero_grad()
        layer(x).square().sum().backward()
        opt.step()

    for _ in range(3):
        step()
    with warnings.catch_warnings():
        warnings.simplefilter("error", StaleOptimizerStateWarning)
        layer.set_rank(1, optimizer=opt)
        step()
        assert not layer.lora_A[1:].any() and not layer.lora_B[:, 1:].any()
        layer.set_rank(2, optimizer=opt, generator=gen)
    update, grad, _ = _regrown_row_step(layer, x, opt, gen)  # a fresh Adam's first step: lr * g / (|g| + eps)
    torch.testing.assert_close(update, -LR * grad / (grad.abs() + 1e-8), rtol=1e-12, atol=0)


class _Lookahead(torch.optim.Optimizer):
    """A wrapper kept as ``.optimizer`` as accelerate's is, without its ``gradient_state`` or
    ``scaler`` (a Lookahead-style wrapper of the user's own)."""

    def __init__(self, optimizer):
        self.optimizer = optimizer
        self.state, self.param_groups, self.defaults = optimizer.state, optimizer.param_groups, optimizer.defaults

    def step(self, closure=None):
        return self.optimizer.step(closure)


def test_a_wrapper_without_accumulation_state_never_skips_a_step():
    from types import SimpleNamespace

    from lorambo.nn.optimizer_argument import inner_optimizer, skips_this_step, wrapper_grad_scaler

    inner = torch.optim.SGD([nn.Parameter(torch.ones(2))], lr=LR)
    wrapper = _Lookahead(inner)
    assert inner_optimizer(wrapper) is inner
    assert skips_this_step(wrapper) is False and wrapper_grad_scaler(wrapper) is None
    wrapper.gradient_state, wrapper.scaler = SimpleNamespace(sync_gradients=False), "scaler"  # accelerate's, mid-accumulation
    assert skips_this_step(wrapper) is True and wrapper_grad_scaler(wrapper) == "scaler"
    wrapper.gradient_state.sync_gradients = True
    assert skips_this_step(wrapper) is False
