"""configure_model on a model in eval mode: the new layers are in eval mode too (no LoRA dropout)."""

import torch
from torch import nn

from lorambo import configure_model, lora_layers


def _reference(layer, x):
    """x Wᵀ + b + s (x A_rᵀ) B_rᵀ in float64, without dropout."""
    r = layer.rank
    w, b = layer.weight.double(), layer.bias.double()
    a, bb = layer.lora_A[:r].double(), layer.lora_B[:, :r].double()
    return x @ w.T + b + layer.scaling * (x @ a.T) @ bb.T


def test_new_layers_take_the_mode_of_the_layers_they_replace():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).double()
    model.eval()
    model[2].train()  # a mixed model: each new layer follows the one it replaces
    configure_model(model, 3, dropout=0.5)
    layers = lora_layers(model)
    assert not layers["0"].training and layers["2"].training
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_B[:, :3].normal_()
    x = torch.randn(5, 8, dtype=torch.float64)
    # in eval mode the adapted layer is deterministic and exactly the adapter's function
    torch.testing.assert_close(layers["0"](x), _reference(layers["0"], x), rtol=1e-12, atol=1e-12)
    h = torch.randn(5, 16, dtype=torch.float64)
    assert not torch.allclose(layers["2"](h), _reference(layers["2"], h))  # train mode: dropout on
