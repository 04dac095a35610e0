"""Shipping a fine-tuned transformers model as one plain checkpoint, the two ways docs/interop.md gives:
``save_pretrained(folder, state_dict=unloaded_state_dict(model))`` (the model stays adapted) and
``unload(model, merge=True).save_pretrained(folder)``. ``from_pretrained`` of the plain class
loads either; its logits equal a float64 model with ``W + s B_r A_r`` written in by hand, and
its greedy generation (KV cache, one-token decode steps) equals the adapted model's.

A plain ``save_pretrained`` of the adapted model is not such a checkpoint: its adapted layers
are keyed ``base_layer.weight`` / ``lora_A`` / ..., which ``from_pretrained`` does not load."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from lorambo import configure_model, lora_layers, unload
from lorambo.integrations.fsdp import unloaded_state_dict

from tiny_causal_lms import tiny_gpt2, tiny_llama


def _adapted(build):
    base = build().eval()
    model = configure_model(copy.deepcopy(base), ranks=4, capacity=8, alpha=8.0, dropout=0.1).eval()
    layers = list(lora_layers(model).values())
    layers[0].set_rank(0)  # every rank: 0, the configured one, and the whole pool
    layers[1].set_rank(8)
    with torch.no_grad():
        for layer in layers:
            layer.lora_B[:, :layer.rank].normal_(std=0.5)
    return base, model


def _float64_merged(base, model):
    """The base model in float64 with each adapted weight replaced by W + s B_r A_r."""
    reference = copy.deepcopy(base).double()
    modules = dict(reference.named_modules())
    with torch.no_grad():
        for name, layer in lora_layers(model).items():
            r = layer.rank
            delta = layer.scaling * layer.lora_B[:, :r].double() @ layer.lora_A[:r].double()  # [out, in]
            weight = modules[name].weight
            weight += delta if layer.base_kind == "linear" else delta.t()
    return reference


@pytest.mark.parametrize("how", ["unloaded_state_dict", "unload"])
@pytest.mark.parametrize("build", [tiny_gpt2, tiny_llama])
def test_a_shipped_merged_checkpoint_loads_as_the_plain_model(tmp_path, build, how):
    base, model = _adapted(build)
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        adapted_logits = model(ids).logits
    adapted_tokens = model.generate(ids[:1], max_new_tokens=6, do_sample=False, pad_token_id=0)
    if how == "unloaded_state_dict":
        model.save_pretrained(tmp_path, state_dict=unloaded_state_dict(model))
        with torch.no_grad():  # the model itself is still the adapted one
            assert torch.equal(model(ids).logits, adapted_logits)
    else:
        unload(copy.deepcopy(model), merge=True).save_pretrained(tmp_path)
    shipped = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(shipped) is type(base)
    with torch.no_grad():
        want = _float64_merged(base, model)(ids).logits
        torch.testing.assert_close(shipped(ids).logits.double(), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(adapted_logits.double(), want, rtol=1e-5, atol=1e-5)
    shipped_tokens = shipped.generate(ids[:1], max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(shipped_tokens, adapted_tokens)


def test_a_plain_save_pretrained_of_the_adapted_model_is_not_a_plain_checkpoint(tmp_path):
    """What docs/interop.md says about ``trainer.save_model()``: the adapted layers' weights are not
    loaded by ``from_pretrained`` of the plain class."""
    base, model = _adapted(tiny_llama)
    model.save_pretrained(tmp_path)
    _, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    adapted = sorted(f"{name}.weight" for name in lora_layers(model))
    assert sorted(k for k in info["missing_keys"] if k in adapted) == adapted
    assert f"{next(iter(lora_layers(model)))}.base_layer.weight" in info["unexpected_keys"]
