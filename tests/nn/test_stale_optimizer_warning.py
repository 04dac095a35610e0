"""A rank change not given the optimizer that holds state for the pools says so, once per
optimizer, naming the optimizer class and the argument to pass; given it, it is silent."""

import warnings

import pytest
import torch
from torch import nn

import lorambo
from lorambo import LoRAMBoLinear
from lorambo.nn import keep_components_many
from lorambo.nn import StaleOptimizerStateWarning

DT = torch.float64


def _stepped(opt_class=torch.optim.Adam, **kwargs):
    """A rank-3 layer whose optimizer has taken one step (so it holds state for the pools)."""
    layer = LoRAMBoLinear(nn.Linear(6, 5, dtype=DT), rank=3, capacity=4, name="fc")
    opt = opt_class([layer.lora_A, layer.lora_B], lr=1e-2, **kwargs)
    layer(torch.randn(4, 6, dtype=DT)).square().sum().backward()
    opt.step()
    return layer, opt


CHANGES = {
    "set_rank": lambda layer, opt: layer.set_rank(1, optimizer=opt),
    "keep_components": lambda layer, opt: layer.keep_components([2, 0], optimizer=opt),
    "keep_components_many": lambda layer, opt: keep_components_many([(layer, [1])], opt),
    "configure_model": lambda layer, opt: lorambo.configure_model(nn.Sequential(layer), {"0": 2}, optimizer=opt),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_rank_change_without_the_optimizer_warns_with_the_argument_to_pass(change):
    layer, opt = _stepped()
    with pytest.warns(StaleOptimizerStateWarning,
                      match=r"LoRAMBoLinear 'fc': .*torch\.optim\.adam\.Adam holds state.*optimizer=<that Adam>"):
        CHANGES[change](layer, None)
    with warnings.catch_warnings():  # once per optimizer
        warnings.simplefilter("error")
        layer.set_rank(3)


@pytest.mark.parametrize("change", list(CHANGES))
def test_rank_change_given_the_optimizer_is_silent(change):
    layer, opt = _stepped(torch.optim.SGD, momentum=0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CHANGES[change](layer, opt)


def test_an_optimizer_without_state_for_the_pools_is_not_reported():
    layer = LoRAMBoLinear(nn.Linear(6, 5, dtype=DT), rank=3, capacity=4)
    torch.optim.Adam([layer.lora_A, layer.lora_B], lr=1e-2)  # never stepped: no state
    other = nn.Linear(2, 2)
    opt = torch.optim.SGD(other.parameters(), lr=1e-2, momentum=0.9)  # steps other parameters
    other(torch.randn(3, 2)).sum().backward()
    opt.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer.set_rank(1)


def test_a_second_optimizer_not_passed_is_reported():
    """A in one optimizer, B in another: passing one leaves the other's state behind."""
    layer = LoRAMBoLinear(nn.Linear(6, 5, dtype=DT), rank=3, capacity=4)
    opt_a = torch.optim.Adam([layer.lora_A], lr=1e-2)
    opt_b = lorambo.optim.AdamW([layer.lora_B], lr=1e-2)
    layer(torch.randn(4, 6, dtype=DT)).square().sum().backward()
    opt_a.step()
    opt_b.step()
    with pytest.warns(StaleOptimizerStateWarning, match=r"lorambo\.optim\.adamw\.AdamW holds state"):
        layer.set_rank(2, optimizer=opt_a)


def test_alora_round_without_the_optimizer_warns():
    from lorambo.allocation.alora import alora_round

    layer, opt = _stepped()
    model = nn.Sequential(layer, LoRAMBoLinear(nn.Linear(5, 6, dtype=DT), rank=2, capacity=4))
    layers = lorambo.lora_layers(model)
    scores = {n: torch.arange(1.0, m.rank + 1, dtype=DT) for n, m in layers.items()}  # prunes fc's slot 0
    with pytest.warns(StaleOptimizerStateWarning, match="optimizer=<that Adam>"):
        alora_round(model, layers, None, None, n_prune=1, scores=scores)


def test_load_state_dict_that_changes_the_rank_warns_about_a_stepped_optimizer():
    """Loading a "best" state_dict of another rank mid-training left Adam's moments on the slots
    it dropped (which Adam then moves off zero) without a word."""
    layer, opt = _stepped()
    best = LoRAMBoLinear(nn.Linear(6, 5, dtype=DT), rank=1, capacity=4).state_dict()
    with warnings.catch_warnings():  # the same rank: no slot changes meaning
        warnings.simplefilter("error")
        layer.load_state_dict(LoRAMBoLinear(nn.Linear(6, 5, dtype=DT), rank=3, capacity=4).state_dict())
    with pytest.warns(StaleOptimizerStateWarning, match=r"LoRAMBoLinear 'fc': rank changed 3 -> 1 by "
                      r"load_state_dict .*torch\.optim\.adam\.Adam holds state.*Load that Adam's state"):
        layer.load_state_dict(best)
    assert layer.rank == 1


def test_pools_loaded_without_extra_state_that_raise_the_rank_warn():
    layer, opt = _stepped()
    layer.set_rank(1, optimizer=opt)
    wider = LoRAMBoLinear(nn.Linear(6, 5, dtype=DT), rank=2, capacity=4)
    with torch.no_grad():
        wider.lora_B.normal_()  # B of the active slots non-zero: a trained adapter
        wider.zero_inactive_()
    pools = {k: v for k, v in wider.state_dict().items() if k.startswith("lora_")}
    with pytest.warns(StaleOptimizerStateWarning, match=r"rank changed 1 -> 2 by load_state_dict"):
        layer.load_state_dict(pools, strict=False)
    assert layer.rank == 2


def test_the_process_wide_optimizer_hooks_are_installed_once():
    """Every LoRAMBoLinear asks for the step hooks (this one's post-hook, the refusal pre-hook of
    lorambo.nn.unsupported_optimizers); one of each runs per step, however many layers exist."""
    from torch.optim import optimizer as torch_optimizer

    from lorambo.nn import optimizer_tracking, unsupported_optimizers

    for _ in range(3):
        LoRAMBoLinear(nn.Linear(6, 5, dtype=DT), rank=1, capacity=2)
    post = [h for h in torch_optimizer._global_optimizer_post_hooks.values() if h is optimizer_tracking._after_step]
    pre = [h for h in torch_optimizer._global_optimizer_pre_hooks.values() if h is unsupported_optimizers._before_step]
    assert len(post) == 1 and len(pre) == 1
