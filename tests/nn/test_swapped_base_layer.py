"""A base layer swapped for a module of another class after wrapping. ``quantize_dynamic``
replaces every nn.Linear, the one inside a LoRAMBoLinear too, by a quantized layer whose
``weight`` is a method: the forward then failed with "'function' object has no attribute
'shape'", and ``unload(merge=True)`` likewise, naming neither the layer nor the cause."""

import copy

import pytest
import torch
from torch import nn

from lorambo import configure_model, lora_layers, unload


def _adapted():
    model = configure_model(nn.Sequential(nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 4)), 2, capacity=4).eval()
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B[:, :2].normal_()
    return model


class Doubled(nn.Linear):
    def forward(self, input):
        return 2 * super().forward(input)


@pytest.mark.parametrize("swap, cls", [
    (lambda m: torch.ao.quantization.quantize_dynamic(m, {nn.Linear}, dtype=torch.qint8),
     r"torch\.ao\.nn\.quantized\.dynamic\.modules\.linear\.Linear"),
    (lambda m: setattr(m[0], "base_layer", Doubled(16, 12)) or m, r"test_swapped_base_layer\.Doubled"),
])
def test_a_swapped_base_layer_is_refused_naming_the_layer_and_its_class(swap, cls):
    model = swap(_adapted())
    x = torch.randn(3, 16)
    match = rf"LoRAMBoLinear '0': its base layer is now a {cls}, put in after the layer was adapted"
    with pytest.raises(TypeError, match=match):
        model(x)
    with pytest.raises(TypeError, match=match):
        unload(model, merge=True)
    assert set(lora_layers(model)) == {"0", "2"} and not any(l.merged for l in lora_layers(model).values())


def test_merged_and_unloaded_first_the_model_quantizes_to_the_merged_weights():
    model = _adapted()
    merged_by_hand = unload(copy.deepcopy(model), merge=False)
    with torch.no_grad():
        for name, layer in lora_layers(model).items():
            delta = layer.scaling * layer.lora_B[:, :2].double() @ layer.lora_A[:2].double()
            merged_by_hand.get_submodule(name).weight.copy_((layer.weight.double() + delta).float())
    x = torch.randn(3, 16)
    quantized = torch.ao.quantization.quantize_dynamic(unload(model, merge=True), {nn.Linear}, dtype=torch.qint8)
    want = torch.ao.quantization.quantize_dynamic(merged_by_hand, {nn.Linear}, dtype=torch.qint8)
    torch.testing.assert_close(quantized(x), want(x), rtol=0, atol=0)
