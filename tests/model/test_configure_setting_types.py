"""dropout and use_rslora of the wrong type (strings from a config file, say) are refused by name."""

import pytest
import torch
from torch import nn

from lorambo import LoRAMBoLinear, configure_model, lora_layers


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


BAD = [({"use_rslora": "false"}, r"use_rslora must be True, False or None, got 'false'"),
       ({"use_rslora": 1}, r"use_rslora must be True, False or None, got 1"),
       ({"dropout": "0.1"}, r"dropout must be a number in \[0, 1\) or None, got '0.1'"),
       ({"dropout": True}, r"dropout must be a number in \[0, 1\) or None, got True")]


@pytest.mark.parametrize("kwargs, message", BAD)
def test_configure_model_refuses_them_and_changes_nothing(kwargs, message):
    model = _model()
    with pytest.raises(TypeError, match=r"configure_model: " + message):
        configure_model(model, 2, **kwargs)
    assert not lora_layers(model) and all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("kwargs, message", BAD)
def test_configure_model_refuses_them_for_existing_adapters(kwargs, message):
    model = configure_model(_model(), 2)
    with pytest.raises(TypeError, match=r"configure_model: " + message):
        configure_model(model, 3, **kwargs)
    assert {n: l.rank for n, l in lora_layers(model).items()} == {"0": 2, "2": 2}


@pytest.mark.parametrize("kwargs, message", [
    ({"use_rslora": "false"}, r"use_rslora must be True or False, got 'false'"),
    ({"dropout": "0.1"}, r"dropout must be a number in \[0, 1\), got '0.1'"),
    ({"dropout": None}, r"dropout must be a number in \[0, 1\), got None")])
def test_the_layer_refuses_them(kwargs, message):
    with pytest.raises(TypeError, match=r"LoRAMBoLinear 'fc': " + message):
        LoRAMBoLinear(nn.Linear(8, 4), 2, name="fc", **kwargs)


def test_alpha_zero_is_refused():
    # before: accepted; scaling 0 made every LoRA gradient 0, so training changed nothing
    model = _model()
    with pytest.raises(ValueError, match=r"LoRAMBoLinear '0': scaling is 0 \(alpha=0.0\), so the adapter would "
                                         r"add nothing"):
        configure_model(model, 2, alpha=0)
    assert not lora_layers(model) and all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match=r"LoRAMBoLinear 'fc': scaling is 0"):
        LoRAMBoLinear(nn.Linear(8, 4), 2, scaling=0.0, name="fc")
