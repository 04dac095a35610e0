"""A merge whose sum overflows the weight's dtype (float16: 65504) is refused naming the layer,
before any weight changes; one that fits merges to the float64 sum rounded once, also when the
cheap bound cannot rule overflow out."""

import pytest
import torch
from torch import nn

import lorambo
from lorambo.integrations.fsdp import unloaded_state_dict


def _model(big_delta: bool):
    """Two float16 layers; layer '1' gets an adapter whose delta reaches about 1.2e5 if ``big_delta``,
    else one with as large factor norms (s |B_i| |A_:j| about 1.2e5) whose slots nearly cancel."""
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4)).half()
    lorambo.configure_model(model, ranks=2, target_modules=["0", "1"], alpha=2.0)
    with torch.no_grad():
        model[0].lora_B[:, :2].copy_(torch.randn(8, 2, generator=g))
        a = torch.randn(2, 8, generator=g) + 100.0
        b = torch.randn(4, 2, generator=g) * 10.0 + 600.0  # delta ~ 2 * 600 * 100
        if not big_delta:
            b[:, 1] = -b[:, 0]  # the two slots cancel but for A's difference
            a[1] = a[0] + torch.randn(8, generator=g) * 0.5
        model[1].lora_A[:2].copy_(a)
        model[1].lora_B[:, :2].copy_(b)
    return model


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}


OVERFLOW = r"LoRAMBoLinear '1': merging would put \d+ non-finite value\(s\) \(inf/NaN\) into the torch.float16 base " \
           r"weight \(largest \|w \+ delta\| [\d.e+]+; torch.float16 holds up to 65504\). Nothing was changed"


def test_unload_refuses_an_overflowing_merge_before_changing_any_layer():
    # before: unload(merge=True) wrote inf into layer '1' (layer '0' merged too), silently
    model = _model(big_delta=True)
    before = _snapshot(model)
    with pytest.raises(RuntimeError, match=rf"^unload\(merge=True\): {OVERFLOW}"):
        lorambo.unload(model, merge=True)
    assert all(isinstance(m, lorambo.LoRAMBoLinear) and not m.merged for m in model)
    after = _snapshot(model)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_layer_merge_and_unloaded_state_dict_refuse_it_too():
    model = _model(big_delta=True)
    weight = model[1].base_layer.weight.clone()
    with pytest.raises(RuntimeError, match=rf"^merge: {OVERFLOW}"):
        model[1].merge()
    assert not model[1].merged and torch.equal(model[1].base_layer.weight, weight)
    assert model[1]._weight_before_merge is None
    with pytest.raises(RuntimeError, match=rf"^unloaded_state_dict: {OVERFLOW}"):
        unloaded_state_dict(model)


def test_a_merge_that_fits_equals_the_float64_sum_rounded_once():
    model = _model(big_delta=False)
    layer = model[1]
    assert float(layer.scaling * layer.lora_B[:, :2].detach().float().norm(dim=1).max()
                 * layer.lora_A[:2].detach().float().norm(dim=0).max()) > 65504  # the bound alone cannot tell
    expected = {}
    for name, m in (("0", model[0]), ("1", layer)):
        delta = m.lora_B[:, :2].double() @ m.lora_A[:2].double() * m.scaling
        expected[name] = (m.base_layer.weight.double() + delta).half()
    assert expected["1"].isfinite().all() and expected["1"].abs().max() > 1  # the delta is not negligible
    state = unloaded_state_dict(model)
    lorambo.unload(model, merge=True)
    for name in ("0", "1"):
        assert torch.equal(model.get_submodule(name).weight, expected[name])
        assert torch.equal(state[f"{name}.weight"], expected[name])


def test_a_model_on_the_meta_device_still_merges():
    # the check reads values, which meta tensors do not have: unload(merge=True) raised
    # "Tensor.item() cannot be called on meta tensors" with the check, where it had worked before
    with torch.device("meta"):
        model = lorambo.configure_model(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4)).half(), 2)
    model[0].merge()
    model[0].unmerge()
    lorambo.unload(model, merge=True)
    assert [type(m) for m in model] == [nn.Linear, nn.Linear] and model[1].weight.is_meta
    assert model[1].weight.dtype == torch.float16


def test_unload_without_merge_is_not_checked_and_gives_back_the_base_weights():
    # the adapter would overflow a merge, but unload(merge=False) merges nothing
    model = _model(big_delta=True)
    weights = [m.base_layer.weight.detach().clone() for m in model]
    lorambo.unload(model, merge=False)
    assert [type(m) for m in model] == [nn.Linear, nn.Linear]
    assert all(torch.equal(m.weight, w) for m, w in zip(model, weights))


def test_a_layer_merged_already_is_not_checked_again():
    """Layer '1' merged on its own (its sum, about 4e4, fits float16); merging its delta a second
    time would overflow, but unload(merge=True) leaves a merged layer's weight as it is: the model
    keeps the float64 sum rounded once."""
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4)).half()
    lorambo.configure_model(model, ranks=2, target_modules=["0", "1"], alpha=2.0)
    with torch.no_grad():
        model[0].lora_B[:, :2].copy_(torch.randn(8, 2, generator=g))
        model[1].lora_A[:2].copy_(torch.randn(2, 8, generator=g) * 0.1 + 50.0)
        model[1].lora_B[:, :2].copy_(torch.randn(4, 2, generator=g) + 400.0)  # delta ~ 2 * 400 * 50 = 4e4 (scaling 1)
    expected = {}
    for name, m in (("0", model[0]), ("1", model[1])):
        delta = m.lora_B[:, :2].double() @ m.lora_A[:2].double() * m.scaling
        expected[name] = (m.base_layer.weight.double() + delta).half()
    assert 32752 < expected["1"].abs().min() and expected["1"].abs().max() < 65504  # twice the delta overflows
    model[1].merge()
    lorambo.unload(model, merge=True)
    for name in ("0", "1"):
        assert torch.equal(model.get_submodule(name).weight, expected[name]), name
