"""``layer.weight = p`` / ``layer.bias = p`` as on nn.Linear: model code that swaps a layer's
weight (transformers' tie_weights does ``setattr(lm_head, "weight", embedding.weight)``) got a
KeyError ("attribute 'weight' already exists") from the drop-in. The assigned Parameter becomes
the base layer's; what cannot be honoured is refused naming the layer."""

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lorambo import LoRAMBoLinear


def _layer(base):
    layer = LoRAMBoLinear(base.double(), rank=2, capacity=4, alpha=6.0, name="blocks.0.fc")
    with torch.no_grad():
        layer.lora_B[:, :2].normal_()
    return layer


def _want(layer, x, weight, bias):
    """Float64 x W^T + b + s (x A_r^T) B_r^T from the given [out, in] weight and bias."""
    a, b = layer.lora_A[:2].detach(), layer.lora_B[:, :2].detach()
    y = x @ weight.t() + layer.scaling * (x @ a.t()) @ b.t()
    return y if bias is None else y + bias


def test_assigned_weight_and_bias_are_the_ones_the_forward_uses():
    layer = _layer(nn.Linear(6, 5))
    x = torch.randn(3, 6, dtype=torch.float64)
    weight = nn.Parameter(torch.randn(5, 6, dtype=torch.float64), requires_grad=False)
    bias = nn.Parameter(torch.randn(5, dtype=torch.float64), requires_grad=False)
    layer.weight, layer.bias = weight, bias
    assert layer.weight is weight and layer.base_layer.weight is weight and layer.bias is bias
    assert layer.state_dict(keep_vars=True)["base_layer.weight"] is weight
    torch.testing.assert_close(layer(x), _want(layer, x, weight, bias), rtol=1e-12, atol=1e-12)
    layer.bias = None
    assert layer.base_layer.bias is None
    torch.testing.assert_close(layer(x), _want(layer, x, weight, None), rtol=1e-12, atol=1e-12)


def test_a_conv1d_bias_can_be_assigned_and_its_weight_is_refused_with_the_layout():
    layer = _layer(Conv1D(5, 6))  # weight [in, out] = [6, 5]
    x = torch.randn(3, 6, dtype=torch.float64)
    bias = nn.Parameter(torch.randn(5, dtype=torch.float64), requires_grad=False)
    layer.bias = bias
    assert layer.base_layer.bias is bias
    torch.testing.assert_close(layer(x), _want(layer, x, layer.base_layer.weight.t(), bias), rtol=1e-12, atol=1e-12)
    with pytest.raises(TypeError, match=r"'blocks.0.fc'.*assign base_layer.weight \(shape \[6, 5\]\)"):
        layer.weight = nn.Parameter(torch.randn(5, 6, dtype=torch.float64))
    with pytest.raises(ValueError, match="'blocks.0.fc': bias cannot be None on a Conv1D base"):
        layer.bias = None


@pytest.mark.parametrize("name,value,match", [
    ("weight", nn.Parameter(torch.randn(6, 5)), r"weight must be an nn.Parameter of shape \[5, 6\].*shape \[6, 5\]"),
    ("weight", torch.randn(5, 6), r"weight must be an nn.Parameter.*got Tensor"),
    ("weight", None, "weight cannot be None"),
    ("bias", nn.Parameter(torch.randn(6)), r"bias must be an nn.Parameter of shape \[5\]"),
])
def test_a_wrong_assignment_is_refused_and_changes_nothing(name, value, match):
    layer = _layer(nn.Linear(6, 5))
    before = getattr(layer, name)
    with pytest.raises((ValueError, TypeError), match=f"'blocks.0.fc': {match}"):
        setattr(layer, name, value)
    assert getattr(layer, name) is before


def test_assigning_into_a_merged_layer_is_refused():
    layer = _layer(nn.Linear(6, 5))
    layer.merge()
    merged = layer.base_layer.weight.detach().clone()
    with pytest.raises(RuntimeError, match="'blocks.0.fc': unmerge\\(\\) before assigning weight"):
        layer.weight = nn.Parameter(torch.randn(5, 6, dtype=torch.float64))
    assert torch.equal(layer.base_layer.weight, merged)
