"""``torch.jit.script`` cannot compile LoRAMBoLinear (its forward dispatches to the op backends
in Python); it used to fail deep in TorchScript ("Compiled functions can't take ... keyword-only
arguments"), naming no layer and no way out. The merged, unloaded model scripts."""

import pytest
import torch
from torch import nn

from lorambo import configure_model, lora_layers, unload


def test_script_is_refused_naming_the_layer_and_the_merged_model_scripts():
    model = configure_model(nn.Sequential(nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 4)), 2, capacity=4,
                            alpha=3.0).eval()
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B[:, :2].normal_()
    with pytest.raises(TypeError, match=r"LoRAMBoLinear '0': torch.jit.script cannot compile.*torch.jit.trace or "
                                        r"torch.export.*lorambo.unload\(model, merge=True\)"):
        torch.jit.script(model)
    x = torch.randn(3, 16)
    h = x.double()  # float64 reference: x W^T + b + s (x A_r^T) B_r^T per layer
    for layer in lora_layers(model).values():
        a, b = layer.lora_A[:2].detach().double(), layer.lora_B[:, :2].detach().double()
        h = h @ layer.weight.detach().double().t() + layer.bias.detach().double() + layer.scaling * (h @ a.t()) @ b.t()
        if layer is model[0]:
            h = torch.tanh(h)
    scripted = torch.jit.script(unload(model, merge=True))
    torch.testing.assert_close(scripted(x).double(), h, rtol=1e-5, atol=1e-5)
