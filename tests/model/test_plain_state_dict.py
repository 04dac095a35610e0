"""The plain model's state_dict loads into the adapted model: ``fc.weight`` goes to
``fc.base_layer.weight``. Built under torch.device("meta") and configured, then loaded from a
plain (pretrained) checkpoint with strict=False, the base layers used to keep the memory
``to_empty`` left, silently; the only missing keys are now the adapters'."""

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lorambo import LoRAMBoLinear, configure_model, lora_layers


def _plain():
    return nn.Sequential(nn.Linear(7, 6), nn.Tanh(), Conv1D(5, 6)).double()  # Conv1D weight [in, out] = [6, 5]


def test_a_plain_checkpoint_loads_into_a_model_configured_on_meta():
    torch.manual_seed(0)
    plain = _plain()
    with torch.device("meta"):
        model = configure_model(_plain(), 2, capacity=4, alpha=6.0)
    model.to_empty(device="cpu")
    result = model.load_state_dict(plain.state_dict(), strict=False)
    assert not result.unexpected_keys
    assert sorted(result.missing_keys) == sorted(f"{n}.{k}" for n in ("0", "2") for k in ("lora_A", "lora_B",
                                                                                           "_extra_state"))
    for layer in lora_layers(model).values():
        layer.reset_parameters()
        with torch.no_grad():
            layer.lora_B[:, :2].normal_()
    x = torch.randn(3, 7, dtype=torch.float64)

    def adapted(layer, u, weight, bias):  # float64 u W^T + b + s (u A_r^T) B_r^T, W as [out, in]
        a, b = layer.lora_A[:2].detach(), layer.lora_B[:, :2].detach()
        return u @ weight.t() + bias + layer.scaling * (u @ a.t()) @ b.t()

    h = torch.tanh(adapted(model[0], x, plain[0].weight.detach(), plain[0].bias.detach()))
    want = adapted(model[2], h, plain[2].weight.detach().t(), plain[2].bias.detach())
    torch.testing.assert_close(model(x), want, rtol=1e-12, atol=1e-12)


def test_a_state_dict_with_both_names_for_one_weight_is_refused():
    layer = LoRAMBoLinear(nn.Linear(6, 5), rank=2, name="blocks.0.fc")
    state = layer.state_dict()
    state["weight"] = torch.zeros(5, 6)
    with pytest.raises(ValueError, match="'blocks.0.fc': the state_dict has both 'weight'.*'base_layer.weight'"):
        layer.load_state_dict(state)
