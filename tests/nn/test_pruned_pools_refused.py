"""torch.nn.utils.prune on a LoRAMBoLinear's pool (``prune.l1_unstructured(layer, "lora_A", ...)``,
or a global magnitude pruning over every parameter of the model) moves the Parameter to
``lora_A_orig`` and recomputes ``lora_A = lora_A_orig * lora_A_mask`` before each call. A rank
change then wrote the new row of A into that product, which the next call overwrote: rank 3
with slot 2 all zero, silently. The forward and the pool edits now refuse, naming the layer and
prune.remove; after it the layer computes with the pruned values."""

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

import lorambo

_REFUSED = (r"LoRAMBoLinear '0': its lora_A and lora_B are pruned \(torch.nn.utils.prune.*\).*"
            r"prune.remove\(layer, 'lora_A'\)")


def test_pruned_pools_are_refused_until_the_pruning_is_made_permanent():
    torch.manual_seed(0)
    model = lorambo.configure_model(nn.Sequential(nn.Linear(6, 5, dtype=torch.float64)), 2)
    layer = model[0]
    with torch.no_grad():
        layer.lora_B[:, :2].normal_()
    pools = [(module, name) for module in model.modules() for name, _ in module.named_parameters(recurse=False)
             if name.startswith("lora_")]
    prune.global_unstructured(pools, pruning_method=prune.L1Unstructured, amount=0.4)
    x = torch.randn(3, 6, dtype=torch.float64)
    for use in (lambda: model(x), lambda: layer.set_rank(3), lambda: layer.keep_components([1]),
                lambda: layer.reset_parameters()):
        with pytest.raises(TypeError, match=_REFUSED):
            use()
    assert layer.rank == 2

    a_pruned, b_pruned = layer.lora_A.detach().clone(), layer.lora_B.detach().clone()
    for name in ("lora_A", "lora_B"):
        prune.remove(layer, name)
    assert torch.equal(layer.lora_A, a_pruned) and torch.equal(layer.lora_B, b_pruned)
    a, b = a_pruned[:2], b_pruned[:, :2]
    want = x @ layer.base_layer.weight.t() + layer.base_layer.bias + layer.scaling * (x @ a.t()) @ b.t()
    torch.testing.assert_close(model(x), want, rtol=1e-12, atol=1e-12)
    layer.set_rank(3)
    assert layer.lora_A[2].abs().sum() > 0  # the new slot's row of A is in the pool itself
