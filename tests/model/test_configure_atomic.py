"""configure_model is all or nothing, and refuses a module used at two places."""

import pytest
import torch
from torch import nn

from lorambo import LoRAMBoLinear, configure_model, lora_layers


def _snapshot(model):
    return ({n: type(m) for n, m in model.named_modules()},
            {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()},
            {n: l.rank for n, l in lora_layers(model).items()})


def _assert_same(model, snap):
    types, params, ranks = snap
    assert {n: type(m) for n, m in model.named_modules()} == types
    now = dict(model.named_parameters())
    assert set(now) == set(params)
    for n, (value, flag) in params.items():
        assert torch.equal(now[n].detach(), value) and now[n].requires_grad == flag, n
    assert {n: l.rank for n, l in lora_layers(model).items()} == ranks


class Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.v, self.o = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 6)

    def forward(self, x):
        return self.o(self.q(x) * self.v(x))


def test_merged_layer_stops_the_whole_reconfiguration():
    model = Attn()
    configure_model(model, {"q": 2, "v": 2}, capacity=6)
    with torch.no_grad():
        model.q.lora_B.normal_()
        model.q.zero_inactive_()
    model.q.merge()
    x = torch.randn(3, 6)
    y = model(x)
    snap = _snapshot(model)
    with pytest.raises(RuntimeError, match=r"'q' is merged.*from 2 to 4"):
        configure_model(model, {"v": 4, "q": 4})
    _assert_same(model, snap)  # v was not re-ranked first
    torch.testing.assert_close(model(x), y, rtol=0, atol=0)
    configure_model(model, {"v": 4, "q": 2})  # same rank for the merged layer: nothing to change
    assert model.v.rank == 4 and model.q.rank == 2 and model.q.merged


@pytest.mark.parametrize("bad, error, match", [
    ({"q": 2, "v": 99}, ValueError, r"LoRAMBoLinear 'v': rank 99 exceeds min\(in, out\) = 6"),
    ({"q": 2, "v": -1}, ValueError, r"LoRAMBoLinear 'v': rank -1 outside \[0, capacity = 6\]"),
    ({"q": 2, "o": 2.5}, TypeError, r"LoRAMBoLinear 'o': rank must be an int, got 2\.5")])
def test_bad_entry_after_good_ones_leaves_the_plain_model_untouched(bad, error, match):
    model = Attn()
    snap = _snapshot(model)
    with pytest.raises(error, match=match):
        configure_model(model, bad, capacity=6)
    _assert_same(model, snap)


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = nn.Linear(4, 4)
        self.second = self.first  # the same module at two places
        self.other = nn.Linear(4, 4)

    def forward(self, x):
        return self.other(self.second(self.first(x)))


@pytest.mark.parametrize("ranks,targets", [(2, None), ({"first": 2}, None), (2, ["first"])])
def test_module_used_twice_is_refused_naming_both_uses(ranks, targets):
    model = Shared()
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=r"used 2 times.*\['first', 'second'\]"):
        configure_model(model, ranks, target_modules=targets)
    _assert_same(model, snap)
    configure_model(model, 2, target_modules=["other"])  # an unshared module is fine
    assert isinstance(model.other, LoRAMBoLinear) and model.first is model.second


@pytest.mark.parametrize("setting,first,second", [
    ("alpha", 4.0, 8.0), ("dropout", 0.0, 0.1), ("use_rslora", False, True), ("capacity", 6, 4)])
def test_a_changed_setting_of_an_existing_adapter_is_refused_not_ignored(setting, first, second):
    # a second call gave q rank 3 and silently kept the old alpha / dropout / rslora / capacity
    torch.manual_seed(0)
    model = Attn()
    configure_model(model, {"q": 2, "v": 2}, capacity=6, **{setting: first} if setting != "capacity" else {})
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=rf"'q' is already a LoRAMBoLinear with {setting}=.*{setting}={second!r} was requested"):
        configure_model(model, {"q": 3, "v": 3, "o": 1}, **{setting: second})
    _assert_same(model, snap)  # q not resized, o not adapted
    # q's base stays on record as frozen by lorambo: an optimizer of it alone still warns
    optimizer = torch.optim.SGD(model.q.base_layer.parameters(), lr=0.1)
    with pytest.warns(UserWarning, match=r"SGD holds 2 of the base weights that lorambo froze.*none of the LoRA pools"):
        optimizer.step()
    # the same value, or None, changes the rank only
    configure_model(model, {"q": 3, "v": 2}, **{setting: first if setting != "capacity" else 6})
    configure_model(model, {"q": 3, "v": 1})
    assert (model.q.rank, model.v.rank, model.q.capacity) == (3, 1, 6)
    assert getattr(model.q, setting) == (first if setting != "capacity" else 6)


def test_a_per_layer_capacity_or_alpha_pattern_is_checked_per_layer():
    model = Attn()
    configure_model(model, {"q": 2, "v": 2}, capacity={"q": 4, "v": 6}, alpha_pattern={"q": 2.0})
    configure_model(model, {"q": 1, "v": 1}, capacity={"q": 4, "v": 6}, alpha_pattern={"q": 2.0})
    with pytest.raises(ValueError, match=r"'q' is already a LoRAMBoLinear with alpha=2.0, and alpha=5.0"):
        configure_model(model, {"q": 1, "v": 1}, alpha_pattern={"q": 5.0})


def test_an_uninitialized_lazy_module_is_refused_before_any_change():
    """configure_model freezes every non-LoRA parameter, and torch refuses requires_grad_ on an
    uninitialized one: the error came from torch after the Linear had been swapped for a
    LoRAMBoLinear, leaving a half-configured model that unload() would not restore."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.LazyLinear(3))
    types = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(ValueError, match=r"uninitialized.*dummy batch") as err:
        configure_model(model, 2, target_modules=["0"])
    assert {n: type(m) for n, m in model.named_modules()} == types
    assert "lazy parameters ['2.weight', '2.bias']" in str(err.value)
    assert model[0].weight.requires_grad and model[0].bias.requires_grad
    x = torch.randn(4, 6)
    expected = model(x)  # the dummy forward materialises the lazy head
    configure_model(model, 2, target_modules=["0"])
    assert isinstance(model[0], LoRAMBoLinear) and not model[2].weight.requires_grad
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
