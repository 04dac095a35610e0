"""SGD momentum starts of new slots (lorambo.nn.fresh_momentum): what is recorded and when, the buffer
a waiting slot starts from, computed here in float64 from torch's SGD update rule. From mutation
testing of lorambo/nn/fresh_momentum.py."""

import pytest
import torch
from torch import nn

from lorambo import LoRAMBoLinear
from lorambo.nn.fresh_momentum import RECORD, install_fresh_momentum

DT = torch.float64
LR = 1e-2


def _stepped(seed=0, rank=2, capacity=4, cls=torch.optim.SGD, **sgd):
    """A layer with a nonzero B, stepped once by cls(**sgd) (an SGD), gradients cleared."""
    gen = torch.Generator().manual_seed(seed)
    layer = LoRAMBoLinear(nn.Linear(6, 5, dtype=DT), rank=rank, capacity=capacity)
    with torch.no_grad():
        layer.lora_B[:, :rank] = torch.randn(5, rank, dtype=DT, generator=gen)
    opt = cls([layer.lora_A, layer.lora_B], lr=LR, **sgd)
    x = torch.randn(4, 6, dtype=DT, generator=gen)
    layer(x).square().sum().backward()
    opt.step()
    opt.zero_grad()
    return layer, opt, x


@pytest.mark.parametrize("sgd", [dict(momentum=0.9), dict(momentum=0.9, nesterov=True), dict()],
                         ids=["dampening0", "nesterov", "no-momentum"])
def test_nothing_is_recorded_where_a_zero_buffer_already_is_a_fresh_start(sgd):
    """With dampening 0 (or no momentum buffer at all) a zero buffer is a fresh SGD's start: growth
    records no waiting slots in the SGD's state."""
    layer, opt, _ = _stepped(**sgd)
    layer.set_rank(3, optimizer=opt)
    for pool in (layer.lora_A, layer.lora_B):
        assert RECORD not in opt.state[pool]


def test_installing_the_step_hook_again_adds_no_second_hook():
    """The process-wide SGD pre-hook is registered once, however many layers are built."""
    from torch.optim.optimizer import _global_optimizer_pre_hooks

    install_fresh_momentum()
    held = len(_global_optimizer_pre_hooks)
    install_fresh_momentum()
    LoRAMBoLinear(nn.Linear(3, 3), rank=1, capacity=2)
    assert len(_global_optimizer_pre_hooks) == held


class DampedMomentum(torch.optim.Optimizer):
    """Not a torch.optim.SGD, but with SGD's group keys (momentum, dampening) and state key
    (momentum_buffer), as optimizers of other libraries have."""

    def __init__(self, params):
        super().__init__(params, dict(lr=LR, momentum=0.9, dampening=0.5))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                    buf.mul_(group["momentum"]).add_(p.grad, alpha=1 - group["dampening"])
                    p.add_(buf, alpha=-group["lr"])


def test_no_record_is_left_in_the_state_of_an_optimizer_that_is_not_torchs_sgd():
    """Only a torch.optim.SGD gets waiting-slot records (its step hook consumes them); another optimizer
    with the same keys gets its new slots' buffers zeroed and nothing else in its state."""
    gen = torch.Generator().manual_seed(3)
    layer = LoRAMBoLinear(nn.Linear(6, 5, dtype=DT), rank=2, capacity=4)
    with torch.no_grad():
        layer.lora_B[:, :2] = torch.randn(5, 2, dtype=DT, generator=gen)
    opt = DampedMomentum([layer.lora_A, layer.lora_B])
    layer(torch.randn(4, 6, dtype=DT, generator=gen)).square().sum().backward()
    opt.step()
    layer.set_rank(1, optimizer=opt)
    layer.set_rank(3, optimizer=opt)
    for pool in (layer.lora_A, layer.lora_B):
        assert set(opt.state[pool]) == {"momentum_buffer"}
    assert torch.equal(opt.state[layer.lora_A]["momentum_buffer"][1:], torch.zeros(3, 6, dtype=DT))


class SubclassSGD(torch.optim.SGD):
    """A subclass of torch's SGD (as libraries wrap it)."""


def test_a_regrown_slot_of_an_sgd_subclass_starts_its_buffer_at_the_update_direction():
    """A subclass of SGD with dampening gets fresh starts too: the new slot's first buffer is its first
    update direction d (B's column; weight decay included), not (1 - dampening) d."""
    layer, opt, x = _stepped(cls=SubclassSGD, momentum=0.9, dampening=0.5, weight_decay=0.1)
    layer.set_rank(3, optimizer=opt)
    layer(x).square().sum().backward()
    d = layer.lora_B.grad[:, 2] + 0.1 * layer.lora_B[:, 2].detach()
    assert d.abs().min() > 0
    opt.step()
    torch.testing.assert_close(opt.state[layer.lora_B]["momentum_buffer"][:, 2], d, rtol=1e-12, atol=0)


def test_keep_components_moves_the_waiting_bits_and_keeps_those_from_the_old_rank_on():
    """The record follows keep_components: slot keep[j]'s bit becomes slot j's, other slots below the old
    rank wait no more, and slots from the old rank on (dropped earlier, zeroed) keep their bits."""
    layer, opt, _ = _stepped(rank=2, capacity=5, momentum=0.9, dampening=0.5)
    layer.set_rank(4, optimizer=opt)  # slots 2, 3 wait
    layer.set_rank(3, optimizer=opt)  # slot 3 dropped: it waits too, for a regrowth
    assert opt.state[layer.lora_A][RECORD] == 0b1100
    layer.keep_components([2, 0], optimizer=opt)  # slot 2 -> 0; slot 1 dropped; slot 3 (>= old rank) kept
    for pool in (layer.lora_A, layer.lora_B):
        assert opt.state[pool][RECORD] == 0b1001


def test_a_waiting_slot_dropped_by_keep_components_leaves_no_record_and_others_step_on():
    """When keep_components drops the only waiting slot, its record goes, and the kept slots' next step
    is plain SGD momentum from their moved buffers: buf = 0.9 buf + 0.5 d."""
    layer, opt, x = _stepped(rank=2, momentum=0.9, dampening=0.5)
    layer.set_rank(3, optimizer=opt)  # slot 2 waits
    bufs = opt.state[layer.lora_B]["momentum_buffer"].clone()
    layer.keep_components([1, 0], optimizer=opt)
    for pool in (layer.lora_A, layer.lora_B):
        assert RECORD not in opt.state[pool]
    layer(x).square().sum().backward()
    d = layer.lora_B.grad[:, :2].clone()
    assert d.abs().min() > 0
    opt.step()
    want = 0.9 * bufs[:, [1, 0]] + 0.5 * d
    torch.testing.assert_close(opt.state[layer.lora_B]["momentum_buffer"][:, :2], want, rtol=1e-12, atol=0)


def test_nothing_is_recorded_through_the_fsdp_integration():
    """Through lorambo.integrations.fsdp the new slots start at zero (as warned): the SGD's state of
    every pool holds no waiting-slot record."""
    import warnings

    import lorambo
    from lorambo.integrations import fsdp

    torch.manual_seed(0)
    model = lorambo.configure_model(nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8)), 1, capacity=4)
    layers = list(lorambo.lora_layers(model).values())
    sgd = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9, dampening=0.5)
    model(torch.randn(4, 8)).square().mean().backward()
    sgd.step()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for layer in layers:
            fsdp.set_rank(layer, 3, optimizer=sgd)
    for param in sgd.param_groups[0]["params"]:
        assert RECORD not in sgd.state.get(param, {})


def test_a_record_meeting_a_step_without_momentum_is_dropped_not_applied():
    """A waiting slot whose group has momentum 0 at its next step (a momentum schedule) is not started
    (there is no buffer to start: dampening / momentum would be inf); the record goes, and once momentum
    is back the slot's buffer follows SGD's rule from zero: 0.9 * 0 + (1 - 0.5) * d."""
    layer, opt, x = _stepped(momentum=0.9, dampening=0.5)
    layer.set_rank(3, optimizer=opt)
    opt.param_groups[0]["momentum"] = 0.0
    layer(x).square().sum().backward()
    opt.step()
    opt.zero_grad()
    for pool in (layer.lora_A, layer.lora_B):
        assert RECORD not in opt.state[pool]
    assert torch.equal(opt.state[layer.lora_B]["momentum_buffer"][:, 2], torch.zeros(5, dtype=DT))
    opt.param_groups[0]["momentum"] = 0.9
    layer(x).square().sum().backward()
    d = layer.lora_B.grad[:, 2].clone()
    assert d.abs().min() > 0
    opt.step()
    torch.testing.assert_close(opt.state[layer.lora_B]["momentum_buffer"][:, 2], 0.5 * d, rtol=1e-12, atol=0)
    assert torch.isfinite(layer.lora_B).all()
