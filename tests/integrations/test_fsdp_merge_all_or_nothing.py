"""``lorambo.integrations.fsdp.merge`` / ``unmerge`` (on an unsharded model, the per-layer calls)
change every layer or none: with one layer already in the target state they used to merge (or
unmerge) the layers before it and then raise there, leaving the model half merged."""

import pytest
import torch
from torch import nn

from lorambo import configure_model, lora_layers
from lorambo.integrations import fsdp


def _model():
    model = configure_model(nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4)),
                            2, capacity=4, alpha=3.0).double()
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B[:, :2].normal_()
    return model


def _state(model):
    return ([layer.merged for layer in lora_layers(model).values()],
            [layer.base_layer.weight.detach().clone() for layer in lora_layers(model).values()])


@pytest.mark.parametrize("call, merged_first, match", [
    (fsdp.merge, ["2"], r"^merge: LoRA layers \['2'\] are merged already; nothing was changed"),
    (fsdp.unmerge, ["2"], r"^unmerge: LoRA layers \['0', '4'\] are not merged; nothing was changed"),
])
def test_a_layer_already_in_the_target_state_is_refused_before_any_change(call, merged_first, match):
    model = _model()
    for name in merged_first:
        lora_layers(model)[name].merge()
    flags, weights = _state(model)
    with pytest.raises(RuntimeError, match=match):
        call(model)
    after_flags, after_weights = _state(model)
    assert after_flags == flags
    assert all(torch.equal(a, b) for a, b in zip(after_weights, weights))


def test_merge_then_unmerge_of_every_layer():
    model = _model()
    x = torch.randn(3, 8, dtype=torch.float64)
    with torch.no_grad():
        want = model(x)
        weights = [layer.base_layer.weight.detach().clone() for layer in lora_layers(model).values()]
        deltas = [layer.scaling * layer.lora_B[:, :2] @ layer.lora_A[:2] for layer in lora_layers(model).values()]
        fsdp.merge(model, exact=True)
        for layer, w, d in zip(lora_layers(model).values(), weights, deltas):
            assert layer.merged
            torch.testing.assert_close(layer.base_layer.weight, w + d, rtol=1e-14, atol=1e-14)
        torch.testing.assert_close(model(x), want, rtol=1e-12, atol=1e-12)
        fsdp.unmerge(model)
        assert all(torch.equal(layer.base_layer.weight, w) for layer, w in zip(lora_layers(model).values(), weights))
