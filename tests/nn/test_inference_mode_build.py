"""A LoRAMBoLinear built (or a model configured) under ``torch.inference_mode()`` keeps working
outside it. Its pools were inference tensors: every later in-place edit (set_rank,
keep_components, zero_inactive_, reset_parameters, load_state_dict, an optimizer step) raised
PyTorch's "Inplace update to inference tensor outside InferenceMode", and a training forward
"Inference tensors cannot be saved for backward". The pools are plain tensors now, as the rank
tensor was already. A base layer itself built in inference mode holds an inference weight:
merge, unmerge and unload refuse it outside inference mode naming the layer, before any change."""

import pytest
import torch
from torch import nn

import lorambo
from lorambo import LoRAMBoLinear, configure_model, lora_layers


def _layer(inference: bool, seed: int = 0) -> LoRAMBoLinear:
    torch.manual_seed(seed)
    base = nn.Linear(8, 6)
    with torch.inference_mode(inference):
        return LoRAMBoLinear(base, rank=2, capacity=4, name="fc")


def _edit_and_train(layer: LoRAMBoLinear, x: torch.Tensor) -> list[torch.Tensor]:
    """Every in-place pool edit, then two SGD steps; the outputs after each."""
    outs = []
    torch.manual_seed(1)
    layer.set_rank(4)  # grow: new rows drawn into lora_A
    outs.append(layer(x).detach())
    with torch.no_grad():
        layer.lora_B.normal_()
    layer.keep_components([3, 0, 1])
    layer.set_rank(2)  # shrink: the tail zeroed
    layer.zero_inactive_()
    outs.append(layer(x).detach())
    layer.load_state_dict({k: v * 1.5 if k.startswith("lora_") else v for k, v in layer.state_dict().items()})
    outs.append(layer(x).detach())
    layer.merge()
    outs.append(layer(x).detach())
    layer.unmerge()
    optimizer = torch.optim.SGD([layer.lora_A, layer.lora_B], lr=0.1)
    for _ in range(2):
        optimizer.zero_grad()
        (layer(x) ** 2).sum().backward()
        optimizer.step()
    outs.append(layer(x).detach())
    layer.reset_parameters(generator=torch.Generator().manual_seed(5))
    outs.append(layer(x).detach())
    return outs


def test_a_layer_built_in_inference_mode_edits_and_trains_outside_it_as_any_other():
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(2))
    built_inside, built_outside = _layer(True), _layer(False)
    assert not built_inside.lora_A.is_inference() and not built_inside.lora_B.is_inference()
    for got, want in zip(_edit_and_train(built_inside, x), _edit_and_train(built_outside, x), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_a_model_configured_in_inference_mode_changes_rank_and_trains_outside_it():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    with torch.inference_mode():
        configure_model(model, 2, capacity=4)
    layers = lora_layers(model)
    for layer in layers.values():
        layer.set_rank(3)
    x = torch.randn(4, 8)
    model(x).sum().backward()
    assert all(layer.rank == 3 and layer.lora_A.grad is not None for layer in layers.values())


def test_merging_into_a_base_weight_made_in_inference_mode_is_refused_outside_it_naming_the_layer():
    torch.manual_seed(0)
    with torch.inference_mode():
        model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    configure_model(model, 2, capacity=4)
    layers = lora_layers(model)
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_B.normal_()
    weights = {name: layer.base_layer.weight.clone() for name, layer in layers.items()}
    message = (r"LoRAMBoLinear '0': {} cannot write into the base weight: it was made under "
               r"torch.inference_mode\(\) \(an inference tensor\)")
    with pytest.raises(RuntimeError, match=message.format("merge")):
        layers["0"].merge()
    with pytest.raises(RuntimeError, match=message.format(r"unload\(merge=True\)")):
        lorambo.unload(model, merge=True)
    assert lora_layers(model).keys() == weights.keys() and not any(layer.merged for layer in layers.values())
    for name, layer in layers.items():  # nothing written
        assert torch.equal(layer.base_layer.weight, weights[name])

    with torch.inference_mode():  # where PyTorch lets it write
        layers["0"].merge()
    with pytest.raises(RuntimeError, match=message.format("unmerge")):
        layers["0"].unmerge()
    with pytest.raises(RuntimeError, match=message.format(r"unload\(merge=False\)")):
        lorambo.unload(model, merge=False)
    assert layers["0"].merged and set(lora_layers(model)) == {"0", "2"}
    with torch.inference_mode():
        lorambo.unload(model, merge=False)
    assert torch.equal(model[0].weight, weights["0"])
