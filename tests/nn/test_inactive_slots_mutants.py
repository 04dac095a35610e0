"""The step post-hook that keeps inactive pool slots at zero (lorambo.nn.inactive_slots): every
inactive slot from the rank on, rank 0 included, with the hook installed once.
From mutation testing of lorambo/nn/inactive_slots.py."""

import torch
from torch import nn

from lorambo import LoRAMBoLinear
from lorambo.nn.inactive_slots import zero_inactive_after_steps

DT = torch.float64


class DriftSGD(torch.optim.SGD):
    """SGD whose step also writes a nonzero value into every element of the parameters it steps, as an
    optimizer with momentum kept out of lorambo's sight moves dropped slots."""

    @torch.no_grad()
    def step(self, closure=None):
        super().step(closure)
        for group in self.param_groups:
            for p in group["params"]:
                p.add_(0.25)


def _layer(rank):
    gen = torch.Generator().manual_seed(rank)
    layer = LoRAMBoLinear(nn.Linear(6, 5, dtype=DT), rank=rank, capacity=4)
    with torch.no_grad():
        layer.lora_B[:, :rank] = torch.randn(5, rank, dtype=DT, generator=gen)
    return layer, torch.randn(3, 6, dtype=DT, generator=gen)


def _check_after_step(make_optimizer, rank):
    layer, x = _layer(rank)
    opt = make_optimizer([layer.lora_A, layer.lora_B])
    layer(x).square().sum().backward()
    before = [layer.lora_A.detach().clone(), layer.lora_B.detach().clone()]
    grads = [layer.lora_A.grad.clone(), layer.lora_B.grad.clone()]
    opt.step()
    want_a = before[0] - 0.1 * grads[0] + 0.25
    want_b = before[1] - 0.1 * grads[1] + 0.25
    want_a[rank:] = 0
    want_b[:, rank:] = 0
    torch.testing.assert_close(layer.lora_A.detach(), want_a, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(layer.lora_B.detach(), want_b, rtol=1e-12, atol=1e-15)
    assert torch.count_nonzero(layer.lora_A[rank:]) == 0 and torch.count_nonzero(layer.lora_B[:, rank:]) == 0


def test_every_slot_of_a_rank_zero_layer_is_zeroed_after_a_step():
    """At rank 0 every slot is inactive: slot 0 too is zero after a step that moved it."""
    _check_after_step(lambda p: DriftSGD(p, lr=0.1), rank=0)


def test_slots_from_the_rank_on_are_zeroed_and_active_ones_kept():
    """At rank 2 of 4, slots 2 and 3 are zeroed after the step; slots 0 and 1 keep the optimizer's update."""
    _check_after_step(lambda p: DriftSGD(p, lr=0.1), rank=2)


def test_installing_the_step_hook_again_adds_no_second_hook():
    """The process-wide post-hook is registered once, however many layers are built."""
    from torch.optim.optimizer import _global_optimizer_post_hooks

    zero_inactive_after_steps()
    held = len(_global_optimizer_post_hooks)
    zero_inactive_after_steps()
    LoRAMBoLinear(nn.Linear(3, 3), rank=1, capacity=2)
    assert len(_global_optimizer_post_hooks) == held


def test_inactive_slots_of_a_pool_swapped_into_one_entry_of_a_group_are_zeroed():
    """Only one entry of a group's list replaced (``params[1] = other layer's lora_B``), the others kept:
    the pool put there has its inactive slots zeroed after the next step, the first layer's A still too."""
    first, x = _layer(2)
    second, _ = _layer(1)
    opt = DriftSGD([first.lora_A, first.lora_B], lr=0.1)
    for swap in (False, True):
        if swap:
            opt.param_groups[0]["params"][1] = second.lora_B
        opt.zero_grad()
        first(x).square().sum().backward()
        second(x).square().sum().backward()
        opt.step()
    assert torch.count_nonzero(second.lora_B[:, 1:]) == 0 and torch.count_nonzero(second.lora_B[:, :1]) == 5
    assert torch.count_nonzero(first.lora_A[2:]) == 0 and torch.count_nonzero(first.lora_A[:2]) == 12
