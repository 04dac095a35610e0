"""peft applied to a lorambo-adapted model: peft's ``all-linear`` (``get_peft_model``, and
transformers' ``add_adapter``) takes the Linear / Conv1D inside each ``LoRAMBoLinear`` and puts
its own LoRA layer there, a second adapter on the layer. The forward refuses it naming peft and
the ways that work, not as the quantization pass it looks like."""

import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model
from test_transformers_models import tiny_gpt2, tiny_llama

from lorambo import configure_model, lora_layers

PEFT_MESSAGE = (r"LoRAMBoLinear '{name}': its base layer is now peft's Linear \(peft\.tuners\.lora\.layer\): "
                r"peft \(get_peft_model, .*\) put its own adapter inside this lorambo adapter, in place of the "
                r"{base} it was built on\. Two adapters on one layer are not supported: .*lorambo\.export_peft")


def _wrap_with_get_peft_model(model):
    return get_peft_model(model, LoraConfig(r=2, target_modules="all-linear"))


def _wrap_with_add_adapter(model):
    model.add_adapter(LoraConfig(r=2, target_modules="all-linear"))
    return model


@pytest.mark.parametrize("build,base,first", [(tiny_llama, "nn.Linear", "model.layers.0.self_attn.q_proj"),
                                              (tiny_gpt2, "transformers Conv1D", "transformer.h.0.attn.c_attn")])
@pytest.mark.parametrize("wrap", [_wrap_with_get_peft_model, _wrap_with_add_adapter])
def test_peft_inside_a_lorambo_adapter_is_refused_naming_peft(build, base, first, wrap):
    torch.manual_seed(0)
    model = configure_model(build().eval(), 4, capacity=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's note on GPT-2's fan_in_fan_out
        wrapped = wrap(model)
    layer = lora_layers(model)[first]
    message = PEFT_MESSAGE.format(name=first, base=base)
    with pytest.raises(TypeError, match=message):
        wrapped(input_ids=torch.randint(0, 64, (2, 5)))
    with pytest.raises(TypeError, match=message):
        layer.merge()
