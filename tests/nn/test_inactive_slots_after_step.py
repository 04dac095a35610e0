"""An optimizer whose state lorambo cannot see (a hand-written Lion keeping its momentum in an
attribute of its own) keeps moving slots dropped by a rank shrink: Lion steps by the sign of the
momentum, non-zero with a zero gradient. The forward is right regardless, but save_adapter (a
Trainer checkpoint hours later) refuses non-zero slots past the rank. Every optimizer step leaves
the inactive slots of the pools it steps at zero, and the active slots train exactly as Lion on
the rank-r adapter."""

import torch
from torch import nn

from lorambo import LoRAMBoLinear, load_adapter, save_adapter

LR, BETA = 1e-2, 0.9


class AttributeLion(torch.optim.Optimizer):
    """Lion without weight decay, its momentum kept outside ``self.state``."""

    def __init__(self, params):
        super().__init__(params, dict(lr=LR))
        self.momentum = {}

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                m = self.momentum.setdefault(p, torch.zeros_like(p))
                p.add_((BETA * m + (1 - BETA) * p.grad).sign(), alpha=-group["lr"])
                m.mul_(BETA).add_(p.grad, alpha=1 - BETA)


def _reference_lion(weight, bias, a, b, m_a, m_b, scaling, x, steps):
    """float64 Lion on the rank-r adapter y = x Wᵀ + bias + s (x Aᵀ) Bᵀ, loss mean(y²)."""
    a, b, m_a, m_b = (t.clone() for t in (a, b, m_a, m_b))
    for _ in range(steps):
        a.requires_grad_(True), b.requires_grad_(True)
        y = x @ weight.T + bias + scaling * (x @ a.T) @ b.T
        g_a, g_b = torch.autograd.grad(y.pow(2).mean(), (a, b))
        with torch.no_grad():
            a = a - LR * (BETA * m_a + (1 - BETA) * g_a).sign()
            b = b - LR * (BETA * m_b + (1 - BETA) * g_b).sign()
            m_a, m_b = BETA * m_a + (1 - BETA) * g_a, BETA * m_b + (1 - BETA) * g_b
    return a.detach(), b.detach()


def test_dropped_slots_stay_zero_under_an_optimizer_lorambo_cannot_reset(tmp_path):
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    layer = LoRAMBoLinear(nn.Linear(6, 5, dtype=torch.float64), rank=4, capacity=4, alpha=3.0)
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(5, 4, dtype=torch.float64, generator=gen))
    x = torch.randn(7, 6, dtype=torch.float64, generator=gen)
    opt = AttributeLion([layer.lora_A, layer.lora_B])
    for _ in range(2):
        layer(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    layer(x).pow(2).mean().backward()
    layer.set_rank(2, optimizer=opt)
    opt.step()  # the shrink's step
    opt.zero_grad()
    start = (layer.lora_A[:2].detach().clone(), layer.lora_B[:, :2].detach().clone(),
             opt.momentum[layer.lora_A][:2].clone(), opt.momentum[layer.lora_B][:, :2].clone())
    assert opt.momentum[layer.lora_A][2:].abs().max() > 0  # the state a rank change cannot reach
    for _ in range(3):
        layer(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        assert torch.count_nonzero(layer.lora_A[2:]) == 0 and torch.count_nonzero(layer.lora_B[:, 2:]) == 0

    ref_a, ref_b = _reference_lion(layer.base_layer.weight.detach(), layer.base_layer.bias.detach(), *start,
                                   layer.scaling, x, steps=3)
    torch.testing.assert_close(layer.lora_A[:2].detach(), ref_a, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.lora_B[:, :2].detach(), ref_b, rtol=1e-12, atol=1e-12)

    model = nn.Sequential(layer)
    save_adapter(model, tmp_path / "adapter.safetensors")  # refused before: slots up to 4 at rank 2
    fresh = nn.Sequential(LoRAMBoLinear(nn.Linear(6, 5, dtype=torch.float64), rank=4, capacity=4))
    fresh[0].base_layer.load_state_dict(layer.base_layer.state_dict())
    load_adapter(fresh, tmp_path / "adapter.safetensors")
    expected = x @ layer.base_layer.weight.detach().T + layer.base_layer.bias.detach() \
        + layer.scaling * (x @ ref_a.T) @ ref_b.T
    torch.testing.assert_close(fresh(x).detach(), expected, rtol=1e-12, atol=1e-12)


def _drifting_step(layers, opt, x):
    """A Lion step whose momentum on the inactive slots would move them off zero."""
    for layer in layers:
        layer(x.to(layer.lora_A.dtype)).pow(2).mean().backward()
    for group in opt.param_groups:
        for p in group["params"]:
            opt.momentum[p] = torch.ones_like(p)  # non-zero on every slot, inactive ones included
    opt.step()
    opt.zero_grad()


def _inactive_nonzero(layer) -> int:
    r = layer.rank
    return int(torch.count_nonzero(layer.lora_A[r:])) + int(torch.count_nonzero(layer.lora_B[:, r:]))


def test_inactive_slots_stay_zero_after_the_pools_are_cast_or_added_between_steps():
    """The slots to zero are found once and reused between steps; a cast that stores new pool
    tensors, and a parameter group added to the optimizer, must still be covered."""
    torch.manual_seed(0)
    x = torch.randn(3, 6, dtype=torch.float64)
    first = LoRAMBoLinear(nn.Linear(6, 5, dtype=torch.float64), rank=2, capacity=4)
    second = LoRAMBoLinear(nn.Linear(6, 5, dtype=torch.float32), rank=1, capacity=4)
    opt = AttributeLion([first.lora_A, first.lora_B])
    _drifting_step([first], opt, x)
    assert _inactive_nonzero(first) == 0
    first.float()  # new storage under the same Parameter objects
    opt.momentum = {}
    _drifting_step([first], opt, x)
    assert first.lora_A.dtype == torch.float32 and _inactive_nonzero(first) == 0
    opt.add_param_group({"params": [second.lora_A, second.lora_B]})
    _drifting_step([first, second], opt, x)
    assert _inactive_nonzero(first) == 0 and _inactive_nonzero(second) == 0


def test_lorambo_adamw_is_trusted_to_leave_inactive_slots_alone(monkeypatch):
    """lorambo.optim.AdamW updates active slots only, so the zeroing skips it (no per-step cost);
    its inactive slots stay zero by its own update."""
    import lorambo
    from lorambo.nn import inactive_slots

    looked_up = []
    monkeypatch.setattr(inactive_slots, "_views_of", lambda opt: looked_up.append(opt) or ([], False))
    torch.manual_seed(0)
    layer = LoRAMBoLinear(nn.Linear(6, 5), rank=2, capacity=4)
    adamw, sgd = lorambo.optim.AdamW([layer.lora_A, layer.lora_B]), torch.optim.SGD([layer.lora_A], lr=0.1)
    layer(torch.randn(3, 6)).pow(2).mean().backward()
    adamw.step()
    sgd.step()
    assert looked_up == [sgd]
    assert _inactive_nonzero(layer) == 0


def test_inactive_slots_stay_zero_after_a_pool_gets_new_memory_under_the_same_parameter():
    """``param.data = new`` (torch.nn.utils.vector_to_parameters does it) keeps the Parameter
    object, its tag and its rank, but moves it to other memory: the slots found before it must
    not be the ones zeroed after it."""
    torch.manual_seed(0)
    x = torch.randn(3, 6, dtype=torch.float64)
    layer = LoRAMBoLinear(nn.Linear(6, 5, dtype=torch.float64), rank=2, capacity=4)
    pools = [layer.lora_A, layer.lora_B]
    opt = AttributeLion(pools)
    _drifting_step([layer], opt, x)
    torch.nn.utils.vector_to_parameters(torch.nn.utils.parameters_to_vector(pools).clone(), pools)
    _drifting_step([layer], opt, x)
    assert _inactive_nonzero(layer) == 0


def test_inactive_slots_are_zeroed_alike_with_and_without_the_extension():
    """CPU pools are zeroed by the extension's zero_views_ unless the backend switch is at
    'torch' (then torch._foreach_zero_), switched between steps of one optimizer."""
    import lorambo

    torch.manual_seed(0)
    x = torch.randn(3, 6, dtype=torch.float64)
    layers = [LoRAMBoLinear(nn.Linear(6, 5, dtype=torch.float64), rank=r, capacity=4) for r in (1, 2, 4)]
    opt = AttributeLion([p for layer in layers for p in (layer.lora_A, layer.lora_B)])
    try:
        for backend in ("torch", None, "torch"):
            lorambo.set_backend(backend)
            _drifting_step(layers, opt, x)
            assert all(_inactive_nonzero(layer) == 0 for layer in layers)
            assert all(torch.count_nonzero(layer.lora_B[:, :layer.rank]) > 0 for layer in layers)  # trained
    finally:
        lorambo.set_backend(None)


def test_inactive_slots_stay_zero_after_an_entry_of_a_parameter_list_is_swapped():
    """``group["params"][i] = other`` keeps the list object and its length: the pool put there
    must be zeroed after the next step, not the one it replaced."""
    torch.manual_seed(0)
    x = torch.randn(3, 6, dtype=torch.float64)
    first = LoRAMBoLinear(nn.Linear(6, 5, dtype=torch.float64), rank=2, capacity=4)
    second = LoRAMBoLinear(nn.Linear(6, 5, dtype=torch.float64), rank=1, capacity=4)
    opt = AttributeLion([first.lora_A, first.lora_B])
    _drifting_step([first], opt, x)
    params = opt.param_groups[0]["params"]
    params[0], params[1] = second.lora_A, second.lora_B
    opt.momentum = {}
    _drifting_step([second], opt, x)
    assert _inactive_nonzero(second) == 0
    assert torch.count_nonzero(second.lora_B[:, :second.rank]) > 0  # trained


def test_inactive_slots_stay_zero_after_a_parameter_list_is_extended_in_place():
    """``group["params"].extend(...)`` keeps the list object and every entry it had: the pools
    appended must be zeroed after the next step too."""
    torch.manual_seed(0)
    x = torch.randn(3, 6, dtype=torch.float64)
    first = LoRAMBoLinear(nn.Linear(6, 5, dtype=torch.float64), rank=2, capacity=4)
    second = LoRAMBoLinear(nn.Linear(6, 5, dtype=torch.float64), rank=1, capacity=4)
    opt = AttributeLion([first.lora_A, first.lora_B])
    _drifting_step([first], opt, x)
    opt.param_groups[0]["params"].extend([second.lora_A, second.lora_B])
    opt.momentum = {}
    _drifting_step([first, second], opt, x)
    assert _inactive_nonzero(first) == 0 and _inactive_nonzero(second) == 0
    assert torch.count_nonzero(second.lora_B[:, :second.rank]) > 0  # trained


def test_inactive_slots_stay_zero_after_parameters_the_optimizer_holds_become_pools():
    """Parameters an optimizer already steps, assigned as a layer's pools (same objects, same
    memory, same rank), get the pool tag: the slots found before the assignment (none of them)
    must not be the ones zeroed after it."""
    torch.manual_seed(0)
    x = torch.randn(3, 6, dtype=torch.float64)
    layer = LoRAMBoLinear(nn.Linear(6, 5, dtype=torch.float64), rank=2, capacity=4)
    a = nn.Parameter(torch.randn(4, 6, dtype=torch.float64))
    b = nn.Parameter(torch.randn(5, 4, dtype=torch.float64))
    opt = AttributeLion([a, b])
    a.grad, b.grad = torch.randn_like(a), torch.randn_like(b)
    opt.step()  # not pools yet: every slot moves
    assert torch.count_nonzero(a[2:]) > 0
    with torch.no_grad():
        a[2:], b[:, 2:] = 0, 0
    layer.lora_A, layer.lora_B = a, b
    opt.momentum = {}
    _drifting_step([layer], opt, x)
    assert _inactive_nonzero(layer) == 0
    assert torch.count_nonzero(layer.lora_B[:, :layer.rank]) > 0  # trained
