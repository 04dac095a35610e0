"""modules_to_save on a module whose weight is tied elsewhere (GPT-2's lm_head and wte): peft
trains a copy of the module and leaves the other use on the base weight, so a peft adapter
imported into lorambo, and a lorambo adapter served by peft, compute what they computed where
they were trained. The reference is the other library's float64 logits."""

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import lorambo
from lorambo import export_peft, from_peft, import_peft, lora_layers

from tied_gpt2 import IDS, WEIGHT, tied_gpt2


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _trained_peft(head):
    peft_model = get_peft_model(tied_gpt2(), LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"],
                                                        modules_to_save=[head]))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.2)
    return peft_model.eval()


@pytest.mark.parametrize("head", ["lm_head", "wte"])
def test_peft_adapter_with_a_tied_module_to_save_imports_with_peft_outputs(tmp_path, head):
    peft_model = _trained_peft(head)
    peft_model.save_pretrained(tmp_path)
    expected = _logits(peft_model)
    torch.testing.assert_close(_logits(import_peft(tied_gpt2(), tmp_path)), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(_logits(from_peft(_trained_peft(head))), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("head", ["lm_head", "wte"])
def test_training_a_tied_module_to_save_leaves_the_other_use_and_peft_agrees(tmp_path, head):
    model = lorambo.configure_model(tied_gpt2(), 2, target_modules=["c_attn"], modules_to_save=[head])
    other = "transformer.wte.weight" if head == "lm_head" else "lm_head.weight"
    params = dict(model.named_parameters(remove_duplicate=False))
    before = params[other].detach().clone()
    assert params[WEIGHT[head]].requires_grad and not params[other].requires_grad
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():  # stands in for training the head and the adapters
        params[WEIGHT[head]].add_(torch.randn(64, 32, generator=g, dtype=torch.float64))
        for layer in lora_layers(model).values():
            b = layer.lora_B[:, :layer.rank]  # training leaves the inactive slots at zero
            b.copy_(torch.randn(b.shape, generator=g, dtype=torch.float64) * 0.2)
    assert torch.equal(params[other], before)
    served = PeftModel.from_pretrained(tied_gpt2(), export_peft(model, tmp_path)).eval()
    torch.testing.assert_close(_logits(served), _logits(model), rtol=0, atol=1e-12)
    with lorambo.disable_adapter(model):
        torch.testing.assert_close(_logits(model), _logits(tied_gpt2()), rtol=0, atol=0)
    lorambo.unload(model, merge=False)
    assert all(p.requires_grad for p in model.parameters())


def _llama_tied():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).double().eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


@pytest.mark.parametrize("build,head", [(tied_gpt2, "lm_head"), (_llama_tied, "embed_tokens"),
                                        (_llama_tied, "lm_head")])
def test_ensure_weight_tying_adapter_imports_with_its_tied_head(tmp_path, build, head):
    """With ensure_weight_tying peft saves the module tied to the one to save (the head tied to the
    embedding, under modules_to_save naming only the embedding) and ties it again on loading.
    import_peft refused the file ("tensor 'lm_head.weight' is neither LoRA nor part of a module
    in modules_to_save")."""
    peft_model = get_peft_model(build(), LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "q_proj"],
                                                    modules_to_save=[head], ensure_weight_tying=True))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.2)
    peft_model.eval().save_pretrained(tmp_path)
    expected = _logits(peft_model)
    torch.testing.assert_close(_logits(PeftModel.from_pretrained(build(), tmp_path)), expected, rtol=0, atol=0)
    model = import_peft(build(), tmp_path)
    torch.testing.assert_close(_logits(model), expected, rtol=0, atol=1e-12)
    head_out = model.get_output_embeddings().weight
    assert head_out.requires_grad and head_out is not model.get_input_embeddings().weight  # each its own copy
