"""reset_slot_state / gather_slot_state and the checks around them, called directly and through rank
changes with optimizers whose state is unusual (integer counters, a ``z`` that is not schedule-free,
state kept for a parameter no group steps). From mutation testing of lorambo/nn/optimizer_state.py."""

import warnings

import pytest
import torch
from torch import nn

from lorambo import LoRAMBoLinear, reset_slot_state
from lorambo.nn import gather_slot_state

DT = torch.float64


def _layer(rank=3, capacity=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    layer = LoRAMBoLinear(nn.Linear(6, 5, dtype=DT), rank=rank, capacity=capacity)
    with torch.no_grad():
        layer.lora_B[:, :rank].copy_(torch.randn(5, rank, dtype=DT, generator=gen))
    return layer, torch.randn(7, 6, dtype=DT, generator=gen)


def _train(layer, x, opt, steps=2):
    for _ in range(steps):
        opt.zero_grad()
        layer(x).square().sum().backward()
        opt.step()


def _state_copy(opt, layer):
    return {name: {k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state[getattr(layer, name)].items()}
            for name in ("lora_A", "lora_B")}


def test_reset_slot_state_zeroes_only_the_given_slots_and_keeps_the_step():
    """reset_slot_state(opt, layer, [2]) zeroes Adam's moments of slot 2 (row 2 of A, column 2 of B),
    keeps every other slot's moments and, by default, the shared ``step``."""
    layer, x = _layer()
    opt = torch.optim.Adam([layer.lora_A, layer.lora_B], lr=1e-2)
    _train(layer, x, opt, steps=3)
    before = _state_copy(opt, layer)
    assert before["lora_A"]["exp_avg"][2].abs().min() > 0
    reset_slot_state(opt, layer, [2])
    for name, dim in (("lora_A", 0), ("lora_B", 1)):
        state = opt.state[getattr(layer, name)]
        assert float(state["step"]) == 3.0
        for key in ("exp_avg", "exp_avg_sq"):
            want = before[name][key].clone()
            want.select(dim, 2).zero_()
            assert torch.equal(state[key], want)


def test_reset_slot_state_of_no_slots_changes_nothing_even_when_all_active_are_new():
    """An empty slot list is a no-op: with ``all_active_new=True`` the shared step is not restarted,
    and L-BFGS's history (whole-vector state) is kept."""
    layer, x = _layer()
    opt = torch.optim.Adam([layer.lora_A, layer.lora_B], lr=1e-2)
    _train(layer, x, opt, steps=3)
    before = _state_copy(opt, layer)
    reset_slot_state(opt, layer, [], all_active_new=True)
    for name in ("lora_A", "lora_B"):
        state = opt.state[getattr(layer, name)]
        assert float(state["step"]) == 3.0
        assert all(torch.equal(state[k], before[name][k]) for k in ("exp_avg", "exp_avg_sq"))
    lbfgs = torch.optim.LBFGS([layer.lora_A, layer.lora_B], lr=0.1, history_size=3)

    def closure():
        lbfgs.zero_grad()
        loss = layer(x).square().sum()
        loss.backward()
        return loss

    lbfgs.step(closure)
    held = dict(lbfgs.state[lbfgs._params[0]])
    assert len(held["old_dirs"]) > 0
    reset_slot_state(lbfgs, layer, [])
    state = lbfgs.state[lbfgs._params[0]]
    assert state["n_iter"] == held["n_iter"] and len(state["old_dirs"]) == len(held["old_dirs"])
    assert all(torch.equal(a, b) for a, b in zip(state["old_dirs"], held["old_dirs"]))


def test_reset_slot_state_refuses_a_missing_optimizer():
    """optimizer=None is a TypeError naming reset_slot_state, not a silent no-op."""
    layer, _ = _layer()
    with pytest.raises(TypeError, match=r"reset_slot_state: optimizer is None"):
        reset_slot_state(None, layer, [1])


class QuantizedMomentum(torch.optim.Optimizer):
    """Momentum SGD keeping its buffer as uint8 codes of the parameter's shape times a float64 scale."""

    def __init__(self, params, lr=1e-2):
        super().__init__(params, dict(lr=lr))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["state1"] = torch.full_like(p, 128, dtype=torch.uint8)
                    state["absmax1"] = torch.zeros(1, dtype=DT)
                buf = (state["state1"].to(DT) / 127.5 - 1) * state["absmax1"] * 0.9 + p.grad
                scale = buf.abs().max().clamp_min(1e-12)
                state["absmax1"].fill_(scale)
                state["state1"].copy_(((buf / scale + 1) * 127.5).round().clamp(0, 255).to(torch.uint8))
                p.add_(buf, alpha=-group["lr"])


def test_reset_slot_state_called_directly_refuses_quantized_state_unchanged():
    """The quantized-state refusal holds for reset_slot_state called directly, not only for set_rank:
    a RuntimeError naming the layer, the state key and its dtype, with the codes unchanged."""
    layer, x = _layer()
    opt = QuantizedMomentum([layer.lora_A, layer.lora_B])
    _train(layer, x, opt)
    codes = opt.state[layer.lora_A]["state1"].clone()
    with pytest.raises(RuntimeError, match=r"holds its state 'state1' for the LoRA pools as torch\.uint8"):
        reset_slot_state(opt, layer, [1])
    assert torch.equal(opt.state[layer.lora_A]["state1"], codes)


class CountingMomentum(torch.optim.Optimizer):
    """Momentum SGD that also keeps an int64 step counter tensor (shape []) per parameter, and,
    optionally, its buffer under the key ``z`` (a name schedule-free optimizers use too)."""

    def __init__(self, params, lr=1e-2, key="momentum", **group_extra):
        super().__init__(params, dict(lr=lr, **group_extra))
        self.key = key

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                state.setdefault("count", torch.zeros((), dtype=torch.int64)).add_(1)
                buf = state.setdefault(self.key, torch.zeros_like(p))
                buf.mul_(0.9).add_(p.grad)
                p.add_(buf, alpha=-group["lr"])


@pytest.mark.parametrize("key, extra", [("momentum", {}), ("z", {}), ("z", dict(weight_sum=0.0))],
                         ids=["int-counter", "z-without-weight_sum", "z-weight_sum-in-other-group"])
def test_rank_changes_accept_float_state_beside_integer_counters_and_a_non_schedule_free_z(key, extra):
    """Only non-float state of the parameter's shape is refused (an int64 scalar counter is kept), and
    only a ``z`` in a group with ``weight_sum`` is schedule-free: a momentum buffer named ``z`` in a group
    without it (even when another group has one) is reset like any per-element state."""
    layer, x = _layer()
    groups = [dict(params=[layer.lora_A, layer.lora_B])]
    if extra:  # the pools' group has no weight_sum; another group, stepping an unrelated parameter, has
        groups.append(dict(params=[nn.Parameter(torch.ones(3, dtype=DT))], **extra))
    opt = CountingMomentum(groups, key=key)
    _train(layer, x, opt)
    before = _state_copy(opt, layer)
    layer.set_rank(1, optimizer=opt)
    for name, dim in (("lora_A", 0), ("lora_B", 1)):
        state = opt.state[getattr(layer, name)]
        assert torch.equal(state["count"], torch.tensor(2))
        want = before[name][key].clone()
        want.narrow(dim, 1, 3).zero_()
        assert torch.equal(state[key], want)


def test_schedule_free_z_of_another_shape_is_not_refused():
    """A ``z`` of a shape other than the parameter's (a per-parameter statistic) in a group with
    ``weight_sum`` is not a schedule-free iterate: the rank change goes ahead."""
    layer, x = _layer()
    opt = CountingMomentum([layer.lora_A, layer.lora_B], weight_sum=1.0)
    _train(layer, x, opt)
    for p in (layer.lora_A, layer.lora_B):
        opt.state[p]["z"] = torch.ones(2, dtype=DT)
    layer.set_rank(2, optimizer=opt)
    assert torch.equal(opt.state[layer.lora_A]["z"], torch.ones(2, dtype=DT))
    assert torch.equal(opt.state[layer.lora_A]["momentum"][2:], torch.zeros(2, 6, dtype=DT))


def test_state_kept_for_a_pool_no_group_steps_is_not_taken_for_schedule_free():
    """An optimizer that still holds a ``z`` for pools it no longer steps (removed from its groups,
    whose group has ``weight_sum``) does not make a rank change fail."""
    layer, x = _layer()
    opt = CountingMomentum([layer.lora_A, layer.lora_B], key="z", weight_sum=1.0)
    _train(layer, x, opt)
    opt.param_groups[0]["params"] = [nn.Parameter(torch.ones(3, dtype=DT))]
    layer.set_rank(1, optimizer=opt)
    assert layer.rank == 1


def test_growth_before_any_step_after_a_restart_does_not_warn_about_the_shared_step():
    """Growth from rank 0 restarts Adam's step at 0; a second growth before any step leaves every slot
    fresh, so it gives no shared-step warning (the step count is still 0)."""
    layer, x = _layer(rank=2)
    opt = torch.optim.Adam([layer.lora_A, layer.lora_B], lr=1e-2)
    _train(layer, x, opt)
    layer.set_rank(0, optimizer=opt)
    layer.set_rank(2, optimizer=opt)
    assert float(opt.state[layer.lora_A]["step"]) == 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer.set_rank(3, optimizer=opt)


def test_gather_slot_state_moves_kept_slots_and_zeroes_the_rest_below_old_rank():
    """gather_slot_state(opt, layer, [2, 0], 3): slot 2's state moves to 0, slot 0's to 1, slot 2 is
    zeroed, and slot 3 (beyond the old rank) is left as it was."""
    layer, x = _layer(rank=4)
    opt = torch.optim.Adam([layer.lora_A, layer.lora_B], lr=1e-2)
    _train(layer, x, opt)
    before = _state_copy(opt, layer)
    gather_slot_state(opt, layer, [2, 0], 3)
    for name, dim in (("lora_A", 0), ("lora_B", 1)):
        for key in ("exp_avg", "exp_avg_sq"):
            old, new = before[name][key], opt.state[getattr(layer, name)][key]
            assert torch.equal(new.select(dim, 0), old.select(dim, 2))
            assert torch.equal(new.select(dim, 1), old.select(dim, 0))
            assert torch.equal(new.select(dim, 2), torch.zeros_like(old.select(dim, 2)))
            assert torch.equal(new.select(dim, 3), old.select(dim, 3))


def test_lorambo_adamw_growth_after_steps_gives_no_shared_step_warning():
    """lorambo.optim.AdamW keeps a ``step`` beside its per-slot ``slot_step``: growth after training is
    not warned about (its new slots count their own steps from 0)."""
    from lorambo.optim import AdamW

    layer, x = _layer(rank=2)
    opt = AdamW([layer.lora_A, layer.lora_B], lr=1e-2)
    _train(layer, x, opt, steps=3)
    assert "step" in opt.state[layer.lora_A] and float(opt.state[layer.lora_A]["step"]) > 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer.set_rank(3, optimizer=opt)
    assert opt.state[layer.lora_A]["slot_step"].tolist() == [3, 3, 0, 0]


class SignMomentum(torch.optim.Optimizer):
    """Lion-style update keeping only ``exp_avg`` (no step count), as lion-pytorch does."""

    def __init__(self, params, lr=1e-3):
        super().__init__(params, dict(lr=lr))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    exp_avg = self.state[p].setdefault("exp_avg", torch.zeros_like(p))
                    p.add_(exp_avg.lerp(p.grad, 0.1).sign_(), alpha=-group["lr"])
                    exp_avg.lerp_(p.grad, 0.01)


def test_growth_under_an_optimizer_with_moments_but_no_step_resets_them_without_a_warning():
    """An optimizer with Adam-like moments but no ``step`` (Lion) has no shared step to warn about:
    growth resets the new slots' ``exp_avg`` and keeps the others'."""
    layer, x = _layer(rank=2)
    opt = SignMomentum([layer.lora_A, layer.lora_B])
    _train(layer, x, opt)
    before = opt.state[layer.lora_A]["exp_avg"].clone()
    assert before[:2].abs().min() > 0
    with torch.no_grad():  # stale moments at slot 2 (as left by an optimizer lorambo was not given)
        opt.state[layer.lora_A]["exp_avg"][2].fill_(1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer.set_rank(3, optimizer=opt)
    after = opt.state[layer.lora_A]["exp_avg"]
    assert torch.equal(after[:2], before[:2]) and torch.equal(after[2:], torch.zeros(2, 6, dtype=DT))


def test_rank_changes_before_rprops_first_step_leave_its_empty_state_alone():
    """Rprop creates its state (step sizes starting at lr) at its first step: rank changes before it
    find no state to fill and change none, and the first step then moves every active element by lr."""
    layer, x = _layer(rank=2)
    opt = torch.optim.Rprop([layer.lora_A, layer.lora_B], lr=0.01)
    layer.set_rank(3, optimizer=opt)
    layer.keep_components([2, 0, 1], optimizer=opt)
    layer.set_rank(2, optimizer=opt)
    assert not opt.state.get(layer.lora_A) and not opt.state.get(layer.lora_B)
    before = [p.detach().clone() for p in (layer.lora_A, layer.lora_B)]
    opt.zero_grad()
    layer(x).square().sum().backward()
    grads = [p.grad.clone() for p in (layer.lora_A, layer.lora_B)]
    opt.step()
    assert grads[0][1].abs().min() > 0 and grads[1][:, :2].abs().min() > 0
    for p, b, g in zip((layer.lora_A, layer.lora_B), before, grads):  # Rprop's first step: -lr * sign(grad)
        torch.testing.assert_close(p.detach() - b, -0.01 * g.sign(), rtol=1e-12, atol=1e-15)


def test_gather_slot_state_refuses_quantized_state_unless_the_order_is_kept():
    """gather_slot_state called directly refuses quantized (uint8) state before moving anything; the
    identity order (as a list or a tuple) moves nothing and is accepted."""
    layer, x = _layer()
    opt = QuantizedMomentum([layer.lora_A, layer.lora_B])
    _train(layer, x, opt)
    codes = opt.state[layer.lora_A]["state1"].clone()
    with pytest.raises(RuntimeError, match=r"'state1' for the LoRA pools as torch\.uint8"):
        gather_slot_state(opt, layer, [1, 0], 3)
    assert torch.equal(opt.state[layer.lora_A]["state1"], codes)
    gather_slot_state(opt, layer, (0, 1, 2), 3)
    gather_slot_state(opt, layer, [0, 1, 2], 3)
    assert torch.equal(opt.state[layer.lora_A]["state1"], codes)


def _lbfgs_stepped():
    layer, x = _layer()
    opt = torch.optim.LBFGS([layer.lora_A, layer.lora_B], lr=0.1, history_size=3)

    def closure():
        opt.zero_grad()
        loss = layer(x).square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    assert len(opt.state[opt._params[0]]["old_dirs"]) > 0
    return layer, opt


@pytest.mark.parametrize("keep", [[0, 1, 2], (0, 1, 2), range(3)], ids=["list", "tuple", "range"])
def test_gather_slot_state_in_the_same_order_keeps_lbfgs_history(keep):
    """L-BFGS's history spans every slot, so a reorder empties it; keeping slots 0..old_rank-1 in order
    (given as a list, tuple or range) moves nothing and keeps it."""
    layer, opt = _lbfgs_stepped()
    held = [d.clone() for d in opt.state[opt._params[0]]["old_dirs"]]
    gather_slot_state(opt, layer, keep, 3)
    dirs = opt.state[opt._params[0]]["old_dirs"]
    assert len(dirs) == len(held) and all(torch.equal(a, b) for a, b in zip(dirs, held))
    gather_slot_state(opt, layer, [1, 0, 2], 3)
    assert not opt.state[opt._params[0]]
