"""import_peft of a peft folder that holds the embedding layers whole (peft's save_embedding_layers):
they load into the base model, as PeftModel.from_pretrained loads them."""

import copy
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import GPT2Config, GPT2LMHeadModel

from lorambo import import_peft, lora_layers


def _gpt2(vocab=64):
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).double().eval()  # lm_head tied to transformer.wte


def _saved(tmp_path, targets, vocab=64, **config):
    """A peft folder whose LoRA weights and (tied) token embedding were trained."""
    peft_model = get_peft_model(_gpt2(vocab), LoraConfig(r=3, lora_alpha=5, target_modules=targets,
                                                         init_lora_weights=False, **config))
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        wte = peft_model.get_base_model().transformer.wte.weight
        wte.add_(torch.randn(wte.shape, generator=g, dtype=torch.float64))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model.save_pretrained(tmp_path / "peft", save_embedding_layers=True)
    return tmp_path / "peft"


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("targets", [["c_attn", "c_fc"], ["c_attn", "lm_head"]])
def test_embedding_layers_saved_whole_load_into_the_base_model(tmp_path, targets):
    """Refused before: 'tensor 'lm_head.weight' is neither LoRA nor part of a module in modules_to_save'."""
    folder = _saved(tmp_path, targets)
    saved = load_file(folder / "adapter_model.safetensors")
    assert any("lora_" not in k for k in saved)  # peft stored the embedding beside the LoRA weights
    expected = _logits(PeftModel.from_pretrained(_gpt2(), folder).eval(), IDS)
    model = import_peft(_gpt2(), folder)
    assert set(lora_layers(model)) == {k[len("base_model.model."):-len(".lora_A.weight")]
                                       for k in saved if k.endswith("lora_A.weight")}
    torch.testing.assert_close(_logits(model, IDS), expected, rtol=1e-12, atol=1e-12)
    assert not torch.equal(_logits(model, IDS), _logits(_gpt2(), IDS))  # the embedding matters


def test_embedding_of_another_vocabulary_size_is_refused_naming_it(tmp_path):
    folder = _saved(tmp_path, ["c_attn"], vocab=70)
    model = _gpt2()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"embedding layer 'transformer.wte' whole.*weight: saved \(70, 32\), "
                                         r"model \(64, 32\).*resize the model's token embeddings"):
        import_peft(model, folder)
    assert not lora_layers(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_tied_embedding_saved_with_two_different_values_is_refused(tmp_path):
    folder = _saved(tmp_path, ["c_attn"])
    tensors = load_file(folder / "adapter_model.safetensors")
    tensors["base_model.model.lm_head.weight"] = tensors["base_model.model.lm_head.weight"] + 1.0
    save_file(tensors, folder / "adapter_model.safetensors")
    model = _gpt2()
    with pytest.raises(ValueError, match=r"holds 'lm_head.weight' and 'transformer.wte.weight'|holds "
                                         r"'transformer.wte.weight' and 'lm_head.weight'"):
        import_peft(model, folder)
    assert not lora_layers(model)


def test_non_finite_embedding_is_refused_naming_it(tmp_path):
    folder = _saved(tmp_path, ["c_attn"])
    tensors = load_file(folder / "adapter_model.safetensors")
    for key in ("base_model.model.lm_head.weight", "base_model.model.transformer.wte.weight"):
        tensors[key] = tensors[key].clone()
        tensors[key][5, 7] = float("nan")
    save_file(tensors, folder / "adapter_model.safetensors")
    model = _gpt2()
    wte = model.transformer.wte.weight.detach().clone()
    with pytest.raises(ValueError, match=r"embedding layer '(transformer.wte|lm_head)': parameter 'weight' holds 1 "
                                         r"NaN/inf"):
        import_peft(model, folder)
    assert not lora_layers(model) and torch.equal(model.transformer.wte.weight, wte)


def test_a_failure_after_the_embedding_was_loaded_puts_it_back(tmp_path):
    folder = _saved(tmp_path, ["c_attn"], modules_to_save=["ln_f"])
    model = _gpt2()
    wte = model.transformer.wte.weight.detach().clone()

    def refuse(*args, **kwargs):
        raise RuntimeError("a load hook of the user's")

    model.transformer.ln_f._register_load_state_dict_pre_hook(refuse)
    with pytest.raises(RuntimeError, match="a load hook of the user's"):
        import_peft(model, folder)
    assert not lora_layers(model)
    assert torch.equal(model.transformer.wte.weight, wte)


def test_embedding_on_the_meta_device_is_refused_naming_it(tmp_path):
    folder = _saved(tmp_path, ["c_attn"])
    model = _gpt2()
    model.transformer.wte.weight = torch.nn.Parameter(torch.empty(64, 32, dtype=torch.float64, device="meta"))
    with pytest.raises(ValueError, match=r"embedding layer 'transformer.wte' has its weight on the meta device"):
        import_peft(model, folder)
    assert not lora_layers(model)
