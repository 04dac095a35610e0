"""configure_model on real transformers architectures (tiny configs) and the real MiniLM."""

import copy

import pytest
import torch
from adapted_reference import assert_pool_grads_match, run_reference
from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers.pytorch_utils import Conv1D

from lorambo import configure_model, lora_layers, unload


def tiny_bert():
    return BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=48, max_position_embeddings=32)).eval()


def tiny_gpt2():
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32)).eval()


def tiny_llama():
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=32)).eval()


def _fill_b(model, std=0.05):
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B[:, : layer.rank].normal_(std=std)


def _out(model, ids):
    out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("build,targets,expected", [
    (tiny_bert, ["query", "value"], 4),
    (tiny_gpt2, None, 8),  # c_attn, c_proj, c_fc, mlp.c_proj per block; lm_head excluded
    (tiny_llama, ["q_proj", "v_proj", "down_proj"], 6),
])
def test_swap_train_unload(build, targets, expected):
    model = build()
    base64 = copy.deepcopy(model).double()
    ids = torch.randint(0, 64, (2, 10))
    y0 = _out(model, ids)
    configure_model(model, 2, target_modules=targets)
    layers = lora_layers(model)
    assert len(layers) == expected
    torch.testing.assert_close(_out(model, ids), y0)  # B = 0: same function
    _fill_b(model)
    y1 = _out(model, ids)
    assert not torch.allclose(y1, y0)
    want, leaves = run_reference(base64, model, kwargs={"input_ids": ids})
    want = want.logits if hasattr(want, "logits") else want.last_hidden_state
    torch.testing.assert_close(y1.double(), want, rtol=1e-5, atol=1e-5)
    weights = torch.randn(want.shape, dtype=torch.float64)  # BERT's mean square output is 1 after its LayerNorm
    (y1.double() * weights).sum().backward()
    (want * weights).sum().backward()
    assert_pool_grads_match(model, leaves, rtol=1e-4)
    unload(model)
    torch.testing.assert_close(_out(model, ids), y1, rtol=1e-4, atol=1e-5)


def test_gpt2_conv1d_layers_are_wrapped():
    model = tiny_gpt2()
    configure_model(model, 2)
    layers = lora_layers(model)
    assert all(isinstance(l.base_layer, Conv1D) for l in layers.values())
    assert "lm_head" not in " ".join(layers)
    assert layers["transformer.h.0.attn.c_attn"].out_features == 96


@pytest.mark.slow
def test_real_minilm_offline():
    from lorambo.experiments.minilm import embed, load_minilm

    model, tokenizer = load_minilm()
    base64 = copy.deepcopy(model).double()
    texts = ["The quick brown fox jumps over the lazy dog.", "Return the filename of the source."]
    base = embed(model, tokenizer, texts)
    configure_model(model, {"encoder.layer.0.attention.self.query": 4, "encoder.layer.5.output.dense": 8})
    torch.testing.assert_close(embed(model, tokenizer, texts), base)
    _fill_b(model, std=0.02)
    changed = embed(model, tokenizer, texts)
    batch = dict(tokenizer(texts, padding=True, return_tensors="pt"))
    hidden = run_reference(base64, model, kwargs=batch)[0].last_hidden_state
    mask = batch["attention_mask"][..., None].double()
    want = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)  # masked mean, unit norm
    torch.testing.assert_close(changed.double(), want, rtol=1e-5, atol=1e-6)
    assert (changed - base).abs().max() > 1e-4  # the adapters show
    assert len(lora_layers(model)) == 2 and model.config.hidden_size == 384
