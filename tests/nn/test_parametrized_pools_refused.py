"""torch.nn.utils.parametrize on a LoRAMBoLinear's pool (``register_parametrization(layer,
"lora_A", ...)``) replaces it by a tensor computed at every read. Rank changes edit the pools in
place, so ``set_rank(3)`` then wrote its new row of A into a temporary: the layer reported rank 3
with slot 2 all zero, no error. Every use that would be wrong now refuses, naming the layer and
how to undo it; undone, the layer computes as before."""

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from lorambo import LoRAMBoLinear


class _Doubled(nn.Module):
    def forward(self, pool):
        return 2 * pool


_REFUSED = r"LoRAMBoLinear 'blocks.0.fc': its lora_A is parametrized .*remove_parametrizations\(layer, 'lora_A'\)"


def test_a_parametrized_pool_is_refused_until_the_parametrization_is_removed():
    torch.manual_seed(0)
    layer = LoRAMBoLinear(nn.Linear(6, 5, dtype=torch.float64), rank=2, capacity=4, name="blocks.0.fc")
    with torch.no_grad():
        layer.lora_B[:, :2].normal_()
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(3, 6, dtype=torch.float64)
    parametrize.register_parametrization(layer, "lora_A", _Doubled())
    original = layer.parametrizations.lora_A.original
    kept = original.detach().clone()
    for use in (lambda: layer(x), lambda: layer.set_rank(3), lambda: layer.keep_components([1]),
                lambda: layer.reset_parameters(), lambda: layer.load_state_dict(state, strict=False)):
        with pytest.raises(TypeError, match=_REFUSED):
            use()
    assert layer.rank == 2 and torch.equal(original, kept)  # nothing changed

    parametrize.remove_parametrizations(layer, "lora_A", leave_parametrized=False)
    layer.set_rank(3)
    assert layer.lora_A[2].abs().sum() > 0  # the new slot's row of A is initialised in the pool itself
    a, b = layer.lora_A[:3].detach(), layer.lora_B[:, :3].detach()
    want = x @ layer.base_layer.weight.t() + layer.base_layer.bias + layer.scaling * (x @ a.t()) @ b.t()
    torch.testing.assert_close(layer(x), want, rtol=1e-12, atol=1e-12)
