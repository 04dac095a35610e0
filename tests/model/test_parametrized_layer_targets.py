"""A parametrized layer holds the modules that compute its weight under
``<name>.parametrizations.weight.0``. A target list matches names by suffix, so ``["0"]`` on an
nn.Sequential whose layer 0 is weight-normed matched ``0.parametrizations.weight.0`` too and
configure_model refused it ("_WeightNorm is not nn.Linear"). A parametrization's modules are no
layers of the model: they are left out of target matching, as a LoRAMBoLinear's base layer is."""

import torch
from torch import nn
from torch.nn.utils import parametrizations

from lorambo import configure_model, lora_layers


def test_a_digit_target_adapts_the_weight_normed_layer_not_its_parametrization():
    torch.manual_seed(0)
    model = nn.Sequential(parametrizations.weight_norm(nn.Linear(6, 5, dtype=torch.float64)), nn.Tanh(),
                          nn.Linear(5, 4, dtype=torch.float64))
    configure_model(model, 2, target_modules=["0"])
    assert list(lora_layers(model)) == ["0"]
    layer = model[0]
    with torch.no_grad():
        layer.lora_B[:, :2].normal_()
    base = layer.base_layer.parametrizations.weight
    g, v = base.original0.detach(), base.original1.detach()
    x = torch.randn(3, 6, dtype=torch.float64)
    a, b = layer.lora_A[:2].detach(), layer.lora_B[:, :2].detach()
    want = x @ (g * v / v.norm(dim=1, keepdim=True)).t() + layer.base_layer.bias + layer.scaling * (x @ a.t()) @ b.t()
    torch.testing.assert_close(layer(x), want, rtol=1e-12, atol=1e-12)
