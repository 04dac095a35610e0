"""A refused peft adapter is refused naming what it uses, and only that: a message that listed
"DoRA or biases" for a layer_replication config, or "DoRA or a LoRA bias" for a module with a
bias alone, sent the user looking for a feature their adapter does not have."""

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn

from lorambo import from_peft, import_peft, lora_layers
from lorambo.adapters.peft_import import check_peft_config


def _base():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def _peft(**config):
    model = get_peft_model(_base(), LoraConfig(r=2, target_modules=["0"], init_lora_weights=False, **config))
    with torch.no_grad():
        model.base_model.model[0].lora_B["default"].weight.normal_(generator=torch.Generator().manual_seed(1))
    return model


@pytest.mark.parametrize("config, named", [
    ({"layer_replication": [[0, 1]]}, "layer_replication=[[0, 1]]"),
    ({"use_qalora": True}, "use_qalora=True"),
    ({"use_dora": True}, "use_dora=True"),
    ({"bias": "all"}, "bias='all'"),
])
def test_an_unsupported_config_field_is_named_and_no_other_feature(config, named):
    with pytest.raises(ValueError) as err:
        check_peft_config(config, "adapter")
    message = str(err.value)
    assert message.startswith(f"adapter: unsupported peft LoRA feature(s) {named}; lorambo imports plain LoRA only")
    others = [word for word in ("DoRA", "bias", "qalora", "replication") if word.lower() not in named.lower()]
    assert not [word for word in others if word.lower() in message.lower()], message


@pytest.mark.parametrize("feature, absent", [("dora", "bias"), ("bias", "DoRA")])
def test_from_peft_names_the_feature_a_module_uses(feature, absent):
    """The config says plain LoRA (edited after get_peft_model, or a layer changed by hand), the
    module does not: from_peft names what that module has."""
    model = _peft(use_dora=True) if feature == "dora" else _peft()
    model.peft_config["default"].use_dora = False
    layer = model.base_model.model[0]
    if feature == "bias":
        layer.lora_B["default"].bias = nn.Parameter(torch.randn(8, generator=torch.Generator().manual_seed(2)))
    with pytest.raises(ValueError, match=r"module '0' uses (DoRA|a LoRA bias); lorambo imports plain LoRA only") as err:
        from_peft(model)
    assert absent not in str(err.value), str(err.value)


@pytest.mark.parametrize("tensor, named, absent", [
    ("lora_magnitude_vector", r"DoRA \(its magnitude vector\)", "bias"),
    ("lora_B.bias", r"a LoRA bias \(lora_bias=True\)", "DoRA"),
    ("lora_embedding_A", "LoRA on an embedding", "DoRA"),
])
def test_import_peft_names_the_feature_an_unexpected_tensor_belongs_to(tmp_path, tensor, named, absent):
    """The adapter_config.json says plain LoRA, the weights file holds another feature's tensor."""
    _peft().save_pretrained(tmp_path)
    weights = load_file(tmp_path / "adapter_model.safetensors")
    weights[f"base_model.model.0.{tensor}"] = torch.randn(8, generator=torch.Generator().manual_seed(3))
    save_file(weights, tmp_path / "adapter_model.safetensors")
    assert json.loads((tmp_path / "adapter_config.json").read_text())["use_dora"] is False
    model = _base()
    with pytest.raises(ValueError, match=rf"belongs to {named}, which lorambo does not support") as err:
        import_peft(model, tmp_path)
    assert absent not in str(err.value), str(err.value)
    assert not lora_layers(model)
