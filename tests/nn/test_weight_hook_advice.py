"""A base whose weight one of torch's forward pre-hooks recomputes is refused (LoRAMBoLinear
reads the weight without calling the base). For torch.nn.utils.prune and the old spectral_norm
the error advised removing the hooks or registering them on the LoRAMBoLinear, which loses the
pruning mask or does not work; it now says what does: prune.remove first, or the
parametrizations API, which wraps with identical outputs."""

import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations, prune

import lorambo
from lorambo import LoRAMBoLinear


def test_a_pruned_base_is_refused_with_prune_remove_as_the_fix():
    base = prune.l1_unstructured(nn.Linear(6, 5), "weight", amount=0.5)
    with pytest.raises(TypeError, match=r"'blocks.0.fc'.*torch.nn.utils.prune recomputes its weight from "
                                        r"weight_orig and weight_mask.*prune.remove\(module, 'weight'\)"):
        LoRAMBoLinear(base, rank=2, name="blocks.0.fc")


def test_pruning_every_linear_after_wrapping_stops_the_forward_with_the_fix():
    model = nn.Sequential(nn.Linear(6, 5))
    lorambo.configure_model(model, 2)
    linears = [(m, "weight") for m in model.modules() if isinstance(m, nn.Linear)]  # the base layer
    prune.global_unstructured(linears, pruning_method=prune.L1Unstructured, amount=0.3)
    with pytest.raises(RuntimeError, match=r"'0': cannot run: .*prune.remove\(module, 'weight'\)"):
        model(torch.randn(2, 6))


def test_the_old_spectral_norm_is_refused_and_its_replacement_wraps_with_the_same_outputs():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        old = nn.utils.spectral_norm(nn.Linear(6, 5))
    with pytest.raises(TypeError, match=r"old nn.utils.spectral_norm .*use nn.utils.parametrizations.spectral_norm"):
        LoRAMBoLinear(old, rank=2, name="fc")
    torch.manual_seed(0)
    base = parametrizations.spectral_norm(nn.Linear(6, 5, dtype=torch.float64)).eval()
    layer = LoRAMBoLinear(base, rank=2, name="fc")
    with torch.no_grad():
        layer.lora_B[:, :2].normal_()
    w = base.parametrizations.weight.original.detach()
    u, v = base.parametrizations.weight[0]._u, base.parametrizations.weight[0]._v
    x = torch.randn(3, 6, dtype=torch.float64)
    a, b = layer.lora_A[:2].detach(), layer.lora_B[:, :2].detach()
    want = x @ (w / (u @ w @ v)).t() + base.bias.detach() + layer.scaling * (x @ a.t()) @ b.t()
    torch.testing.assert_close(layer(x), want, rtol=1e-12, atol=1e-12)


def test_each_hook_gets_its_own_advice():
    """The old weight_norm gets its parametrizations replacement; a hook of the user's own gets
    'remove them, or register them on the LoRAMBoLinear', not torch's weight-hook advice."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # nn.utils.weight_norm is deprecated
        normed = nn.utils.weight_norm(nn.Linear(6, 5))
    with pytest.raises(TypeError, match=r"the old nn\.utils\.weight_norm recomputes the weight in one: use "
                                        r"nn\.utils\.parametrizations\.weight_norm, which works"):
        LoRAMBoLinear(normed, rank=2)
    hooked = nn.Linear(6, 5)
    hooked.register_forward_pre_hook(lambda module, args: None)
    with pytest.raises(TypeError, match=r"has forward pre-hooks, .*Remove them, or register them on the "
                                        r"LoRAMBoLinear$") as refused:
        LoRAMBoLinear(hooked, rank=2)
    assert "spectral_norm" not in str(refused.value) and "prune" not in str(refused.value)
