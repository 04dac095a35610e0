"""A transformers model given a peft adapter by transformers' own peft integration
(``model.add_adapter``, ``model.load_adapter``, ``from_pretrained`` of an adapter folder) is no
``PeftModel``: ``configure_model`` refused it pointing to ``from_peft``, which refused it as no
peft model. ``from_peft`` converts it, and clears transformers' adapter record so that
``save_pretrained`` writes the model, not a peft adapter of layers that are gone. The reference
is the plain float64 model with peft's ``W + s B A`` written in."""

import copy
import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import lorambo
from lorambo import from_peft, lora_layers

IDS = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
CONFIGS = {"llama": dict(target_modules=["q_proj", "v_proj", "down_proj"], rank_pattern={"v_proj": 3}),
           "gpt2": dict(target_modules=["c_attn", "c_fc"], rank_pattern={"c_fc": 1})}


def _base(arch):
    torch.manual_seed(0)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2))
    else:
        model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=16))
    return model.double().eval()


def _lora_config(arch):
    return LoraConfig(r=2, lora_alpha=5, init_lora_weights=False, **CONFIGS[arch])


def _deltas(model):
    """{layer: s B A [out, in]} of every peft LoRA layer, in float64."""
    return {name: m.scaling["default"] * m.lora_B["default"].weight.detach() @ m.lora_A["default"].weight.detach()
            for name, m in model.named_modules() if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {})}


def _reference_logits(arch, deltas):
    plain = _base(arch)
    for name, delta in deltas.items():
        layer = plain.get_submodule(name)
        layer.weight = nn.Parameter(layer.weight.detach() + (delta if isinstance(layer, nn.Linear) else delta.T))
    with torch.no_grad():
        return plain(input_ids=IDS).logits


def _with_adapter(arch, how, tmp_path):
    model = _base(arch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's note on GPT-2's fan_in_fan_out
        if how == "add_adapter":
            model.add_adapter(_lora_config(arch))
        else:
            get_peft_model(_base(arch), _lora_config(arch)).save_pretrained(tmp_path / "peft")
            model.load_adapter(str(tmp_path / "peft"))
    return model


@pytest.mark.parametrize("arch,how", [("llama", "add_adapter"), ("llama", "load_adapter"), ("gpt2", "add_adapter")])
def test_from_peft_converts_an_adapter_of_transformers_integration(arch, how, tmp_path):
    model = _with_adapter(arch, how, tmp_path)
    deltas = _deltas(model)
    assert len(deltas) == 2 * len(CONFIGS[arch]["target_modules"])
    expected = _reference_logits(arch, deltas)
    with torch.no_grad():
        assert (expected - _base(arch)(input_ids=IDS).logits).abs().max() > 1e-3  # the adapter matters
    with pytest.raises(ValueError, match="holds peft modules .*lorambo.from_peft"):
        lorambo.configure_model(model, 2)
    converted = from_peft(model)
    assert converted is model and not model._hf_peft_config_loaded and not hasattr(model, "peft_config")
    layers = lora_layers(model)
    assert sorted(layers) == sorted(deltas)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, expected, rtol=0, atol=1e-10)
        for name, layer in layers.items():  # a rank change keeps the function (new B columns are 0)
            layer.set_rank(layer.rank + 1)
        torch.testing.assert_close(model(input_ids=IDS).logits, expected, rtol=0, atol=1e-10)
    model.save_pretrained(tmp_path / "saved")
    saved = sorted(p.name for p in (tmp_path / "saved").iterdir())
    assert "model.safetensors" in saved and "adapter_model.safetensors" not in saved


def test_from_peft_refuses_a_plain_transformers_model_naming_both_kinds():
    with pytest.raises(TypeError, match=r"from_peft expects a peft model \(PeftModel, or a transformers model given "
                                        r"an adapter by add_adapter / load_adapter\), got LlamaForCausalLM"):
        from_peft(copy.deepcopy(_base("llama")))


@pytest.mark.parametrize("how", ["transformers", "peft_layers", "peft_block"])
def test_from_peft_refuses_disabled_adapters_and_changes_nothing(how, tmp_path):
    """A model whose peft adapters are disabled computes the base model; converted, its
    LoRAMBoLinear layers computed the adapter (logits off by the whole adapter)."""
    if how == "transformers":
        model = _with_adapter("llama", "add_adapter", tmp_path)
        model.disable_adapters()
    else:
        model = get_peft_model(_base("llama"), _lora_config("llama"))
        if how == "peft_layers":
            model.base_model.disable_adapter_layers()
    with torch.no_grad():
        expected = _base("llama")(input_ids=IDS).logits
    block = model.disable_adapter() if how == "peft_block" else warnings.catch_warnings()
    with block:
        with pytest.raises(ValueError, match=r"peft adapter 'default': module 'model\.layers\.0\.self_attn\.q_proj' "
                                             r"has its adapters disabled .* enable them"):
            from_peft(model)
        assert not lora_layers(model)
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=IDS).logits, expected, rtol=0, atol=0)
