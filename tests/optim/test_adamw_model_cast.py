"""A model cast after lorambo.optim.AdamW's first step: a clear error before anything changes, and
the remedy it names (reloading the optimizer's own state) continues as AdamW does."""

import pytest
import torch
from torch import nn

import lorambo
from lorambo import configure_model


def _trained(modules_to_save):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 3))
    configure_model(model, 2, target_modules=["0"], modules_to_save=modules_to_save)
    with torch.no_grad():
        model[0].lora_B[:, :2].normal_()
    opt = lorambo.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    model(torch.randn(5, 8)).pow(2).sum().backward()
    opt.step()
    opt.zero_grad()
    model.double()
    model(torch.randn(5, 8, dtype=torch.float64)).pow(2).sum().backward()
    return model, opt


def _everything(model, opt):
    return [t.clone() for t in model.parameters()] + [v.clone() for s in opt.state.values() for v in s.values()]


@pytest.mark.parametrize("modules_to_save", [None, ["1"]], ids=["pools only", "with a head"])
def test_step_after_a_cast_names_the_cause_and_changes_nothing(modules_to_save):
    # before: "lorambo::pool_adamw_: exp_avgs[0] is Float but params[0] is Double" (or torch's
    # "expected dtype float for `end` but got dtype double" with a head), after the step counts moved
    model, opt = _trained(modules_to_save)
    before = _everything(model, opt)
    with pytest.raises(RuntimeError, match=r"lorambo.optim.AdamW: the exp_avg of a parameter of shape \[\d+, 8\] "
                                           r"is torch.float32 on cpu, but the parameter is now torch.float64 on "
                                           r"cpu: the model was cast or moved after the optimizer's first step"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(_everything(model, opt), before, strict=True))


def test_the_named_remedy_continues_as_adamw():
    model, opt = _trained(None)
    opt.load_state_dict(opt.state_dict())  # casts the moments to the parameters' dtype
    pool = model[0].lora_A
    state = opt.state[pool]
    m, v, p, g = (t[:2].clone() for t in (state["exp_avg"], state["exp_avg_sq"], pool.detach(), pool.grad))
    assert m.dtype == torch.float64
    opt.step()
    # AdamW's second step on the active rows, in float64 (lr 1e-2, weight decay 0.1, default betas, eps)
    b1, b2, t = 0.9, 0.999, 2
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    expected = p * (1 - 1e-2 * 0.1) - 1e-2 * (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + 1e-8)
    torch.testing.assert_close(pool[:2].detach(), expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(pool[2:], torch.zeros_like(pool[2:]))


@pytest.mark.parametrize("backend", ["ext", "torch"])
def test_a_cast_pool_in_a_later_param_group_changes_nothing_in_the_earlier_ones(backend):
    # before: the first group's pools were updated (and their step counted) before the cast pool
    # of the second group was refused; every group's state is now checked before any update
    if backend == "ext" and not lorambo.ext.available():
        pytest.skip("the compiled extension is not built")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 3))
    configure_model(model, 2, target_modules=["0", "1"])
    with torch.no_grad():
        for layer in model:
            layer.lora_B[:, :2].normal_()
    opt = lorambo.optim.AdamW([{"params": [model[0].lora_A, model[0].lora_B]},
                               {"params": [model[1].lora_A, model[1].lora_B], "lr": 1e-2}], lr=1e-3)
    x = torch.randn(5, 8)
    model(x).pow(2).sum().backward()
    opt.step()
    model(x).pow(2).sum().backward()
    model[1].double()  # only the second group's layer
    before = _everything(model, opt)
    lorambo.set_backend(backend)
    try:
        with pytest.raises(RuntimeError, match=r"the exp_avg of a parameter of shape \[\d+, \d+\] is torch.float32 "
                                               r"on cpu, but the parameter is now torch.float64"):
            opt.step()
    finally:
        lorambo.set_backend(None)
    assert all(torch.equal(a, b) for a, b in zip(_everything(model, opt), before, strict=True))


@pytest.mark.parametrize("param_dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("moment_dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("moment_device", ["cpu", "meta"])
def test_the_per_step_test_agrees_with_the_check_it_stands_for(param_dtype, moment_dtype, moment_device):
    # step() tests every parameter with _state_left_behind (cheap) and raises through
    # _check_state_follows: the two must agree on every dtype and device pairing
    from lorambo.optim.adamw import _check_state_follows, _state_left_behind

    param = torch.zeros(2, 3, dtype=param_dtype)
    state = {"exp_avg": torch.zeros(2, 3, dtype=moment_dtype, device=moment_device)}
    try:
        _check_state_follows(param, state)
        raises = False
    except RuntimeError:
        raises = True
    assert _state_left_behind(param, state) == raises
    assert not _state_left_behind(param, {}) and not _state_left_behind(param, {"exp_avg": None})
