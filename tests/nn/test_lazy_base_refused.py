"""An uninitialised nn.LazyLinear given to LoRAMBoLinear (or to configure_model by name inside a
model whose other lazy modules are initialised) was refused for its forward pre-hooks, with the
advice to remove them or use parametrizations.weight_norm: that hook is what initialises it.
The error now says the module is not initialised and to run a forward first."""

import pytest
import torch
from torch import nn

from lorambo import LoRAMBoLinear


def test_an_uninitialised_lazy_linear_is_refused_as_such():
    with pytest.raises(TypeError, match=r"LoRAMBoLinear 'blocks.0.fc': .*this LazyLinear is not initialised yet "
                                        r"\(a lazy module before its first forward\).*Run one forward"):
        LoRAMBoLinear(nn.LazyLinear(5), rank=2, name="blocks.0.fc")


def test_a_lazy_linear_after_its_first_forward_wraps_and_computes_as_it():
    torch.manual_seed(0)
    base = nn.LazyLinear(5, dtype=torch.float64)
    x = torch.randn(3, 6, dtype=torch.float64)
    base(x)  # a LazyLinear becomes an nn.Linear at its first forward
    layer = LoRAMBoLinear(base, rank=2, name="fc")
    with torch.no_grad():
        layer.lora_B[:, :2].normal_()
    a, b = layer.lora_A[:2].detach(), layer.lora_B[:, :2].detach()
    want = x @ base.weight.detach().t() + base.bias.detach() + layer.scaling * (x @ a.t()) @ b.t()
    torch.testing.assert_close(layer(x), want, rtol=1e-12, atol=1e-12)
