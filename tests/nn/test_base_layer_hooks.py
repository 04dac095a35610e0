"""LoRAMBoLinear computes x W^T + b from its base's weight without calling the base, so hooks on
the base's call never ran: the old ``nn.utils.weight_norm`` (weight recomputed in a forward
pre-hook) kept the weight of the last plain call (measured max |diff| 1.7 after weight_g changed),
and a forward hook (activation capture on every nn.Linear) silently saw nothing. A hooked base
is refused when named, left out of the default targets, and a hook added after wrapping stops
the forward with the layer's name."""

import warnings

import pytest
import torch
from torch import nn

import lorambo
from lorambo import LoRAMBoLinear


def _weight_normed():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # nn.utils.weight_norm is deprecated
        return nn.utils.weight_norm(nn.Linear(6, 5, dtype=torch.float64))


def test_a_base_whose_weight_a_pre_hook_computes_is_refused_named_and_left_out():
    with pytest.raises(TypeError, match=r"'0' \(Linear\).*forward pre-hooks.*parametrizations.weight_norm"):
        lorambo.configure_model(nn.Sequential(_weight_normed(), nn.Linear(5, 4)), 2, target_modules=["0"])
    model = nn.Sequential(_weight_normed(), nn.Tanh(), nn.Linear(5, 4, dtype=torch.float64))
    lorambo.configure_model(model, 2)
    assert list(lorambo.lora_layers(model)) == ["2"]
    base = model[0]
    with torch.no_grad():
        base.weight_g.mul_(2)
    x = torch.randn(3, 6, dtype=torch.float64)
    weight = base.weight_g * base.weight_v / base.weight_v.norm(dim=1, keepdim=True)
    torch.testing.assert_close(model[0](x), x @ weight.t() + base.bias, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("register", [
    lambda m, f: m.register_forward_pre_hook(lambda mod, args: f()),
    lambda m, f: m.register_forward_hook(lambda mod, args, kwargs, out: f(), with_kwargs=True),
    lambda m, f: m.register_full_backward_hook(lambda mod, gin, gout: f()),
])
def test_a_hook_registered_on_the_base_after_wrapping_stops_the_forward(register):
    layer = LoRAMBoLinear(nn.Linear(6, 5), rank=2, name="blocks.0.fc")
    x = torch.randn(3, 6)
    calls = []
    handle = register(layer.base_layer, lambda: calls.append(1))
    with pytest.raises(RuntimeError, match="'blocks.0.fc': cannot run: this Linear has .*hooks.*never run them"):
        layer(x)
    handle.remove()
    with torch.no_grad():
        layer.lora_B[:, :2].normal_()
    a, b = layer.lora_A[:2].detach().double(), layer.lora_B[:, :2].detach().double()
    w, bias = layer.base_layer.weight.double(), layer.base_layer.bias.double()
    want = x.double() @ w.t() + bias + layer.scaling * (x.double() @ a.t()) @ b.t()
    torch.testing.assert_close(layer(x).double(), want, rtol=1e-6, atol=1e-6)
    assert not calls
