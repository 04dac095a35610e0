"""Default targets are peft's "all-linear" (computed by peft itself here), minus pooler layers."""

import copy

import pytest
import torch
from adapted_reference import assert_pool_grads_match, run_reference
from peft import LoraConfig
from peft.tuners.tuners_utils import _maybe_include_all_linear_layers
from transformers import (BartConfig, BartForSequenceClassification, BertConfig, BertForSequenceClassification,
                          BertModel, BloomConfig, BloomForCausalLM, GPT2Config, GPT2LMHeadModel, RobertaConfig,
                          RobertaForSequenceClassification)

import lorambo
from lorambo import configure_model, lora_layers
from lorambo.model import default_targets
from lorambo.sensitivity.targets import find_targets as sensitivity_targets


def _bert_config():
    return BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=24, max_position_embeddings=16, num_labels=3)


def _peft_all_linear(model, task_type=None):
    config = _maybe_include_all_linear_layers(LoraConfig(target_modules="all-linear", task_type=task_type), model)
    return set(config.target_modules)


@pytest.mark.parametrize("build,task_type", [
    (lambda: BertModel(_bert_config()), None),
    (lambda: BertForSequenceClassification(_bert_config()), "SEQ_CLS"),
    (lambda: GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=2, n_positions=16)), None),
])
def test_default_targets_are_peft_all_linear_without_the_pooler(build, task_type):
    model = build()
    peft_names = _peft_all_linear(model, task_type)
    ours = default_targets(model)
    assert set(ours) == {n for n in peft_names if "pooler" not in n.split(".")}
    assert len(ours) == len(set(ours)) and all("pooler" not in n for n in ours)
    configure_model(model, 2, target_modules="all-linear")
    assert list(lora_layers(model)) == ours


def _roberta_classifier():
    return RobertaForSequenceClassification(RobertaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                                          num_attention_heads=2, intermediate_size=24,
                                                          max_position_embeddings=24, pad_token_id=1, num_labels=2))


def _bart_classifier():
    return BartForSequenceClassification(BartConfig(vocab_size=50, d_model=16, encoder_layers=1, decoder_layers=1,
                                                    encoder_attention_heads=2, decoder_attention_heads=2,
                                                    encoder_ffn_dim=24, decoder_ffn_dim=24, max_position_embeddings=16,
                                                    num_labels=2))


@pytest.mark.parametrize("build,head", [(_roberta_classifier, "classifier"), (_bart_classifier, "classification_head")])
def test_layers_inside_a_classification_head_are_left_out(build, head):
    """RoBERTa's classifier (and Bart's classification_head) holds dense and out_proj, the
    num_labels output layer. Both were default targets, so configure_model(model, 8) failed on
    out_proj (rank 8 > its 2 outputs) and a lower rank adapted the freshly initialised head."""
    model = build()
    expected = {n for n in _peft_all_linear(model, "SEQ_CLS") if head not in n.split(".")}
    assert {f"{head}.dense", f"{head}.out_proj"} <= _peft_all_linear(model, "SEQ_CLS")
    assert set(default_targets(model)) == expected
    assert {t.name for t in sensitivity_targets(model)} == expected
    configure_model(model, 8)
    assert set(lora_layers(model)) == expected
    assert not any(p.requires_grad for p in model.get_submodule(head).parameters())


class _AttentionBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(16, 2, batch_first=True)
        self.ff = torch.nn.Linear(16, 16)
        self.lm_head = torch.nn.Linear(16, 3)

    def forward(self, x):
        y, _ = self.attn(x, x, x)
        return self.lm_head(self.ff(y))


def test_multihead_attention_out_proj_is_left_out_and_refused_by_name():
    """nn.MultiheadAttention passes out_proj.weight to F.multi_head_attention_forward: wrapped,
    its LoRA would get no gradient and change nothing (it did before it was left out)."""
    model = _AttentionBlock()
    assert default_targets(model) == ["ff"]
    assert [t.name for t in sensitivity_targets(model)] == ["ff"]
    for targets in (["out_proj"], r"attn\..*", {"attn.out_proj": 2}):
        with pytest.raises(ValueError, match=r"'attn.out_proj' .*nn.MultiheadAttention.*never run"):
            if isinstance(targets, dict):
                lorambo.configure_model(_AttentionBlock(), targets)
            else:
                lorambo.configure_model(_AttentionBlock(), 2, target_modules=targets)
    base64 = copy.deepcopy(model).double()
    lorambo.configure_model(model, 2)
    layer = lorambo.lora_layers(model)["ff"]
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(2, 5, 16)
    model(x).sum().backward()
    want, leaves = run_reference(base64, model, (x.double(),))
    want.sum().backward()
    assert_pool_grads_match(model, leaves, rtol=1e-5)


_BLOOM_SLOW = {"pretraining_tp": 2, "slow_but_exact": True}


@pytest.mark.parametrize("settings,bypassed", [
    ({}, set()),
    ({"pretraining_tp": 2}, set()),  # slow_but_exact off: both layers are called
    ({"slow_but_exact": True}, set()),  # pretraining_tp 1: one slice, the layers are called
    (_BLOOM_SLOW, {"transformer.h.0.self_attention.dense", "transformer.h.0.mlp.dense_4h_to_h"}),
])
def test_bloom_projections_it_slices_are_left_out_and_refused_by_name(settings, bypassed):
    """BLOOM with pretraining_tp > 1 and slow_but_exact runs F.linear on slices of its attention
    dense.weight and its MLP dense_4h_to_h.weight. The MLP's was targeted: its LoRA never ran."""
    def bloom():
        torch.manual_seed(0)
        return BloomForCausalLM(BloomConfig(vocab_size=40, hidden_size=16, n_layer=1, n_head=2, **settings)).eval()

    model = bloom()
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)} - {"lm_head"}
    assert set(default_targets(model)) == linears - bypassed
    for name in sorted(bypassed):
        with pytest.raises(ValueError, match=rf"'{name}' .*reads \w+\.weight directly"):
            configure_model(bloom(), 2, target_modules=[name])
    base64 = copy.deepcopy(model).double()
    configure_model(model, 2)
    torch.manual_seed(1)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.normal_()
    ids = torch.randint(0, 40, (2, 5))
    weights = torch.randn(2, 5, 40, dtype=torch.float64)
    (model(ids).logits.double() * weights).sum().backward()
    want, leaves = run_reference(base64, model, (ids,))
    torch.testing.assert_close(model(ids).logits.double(), want.logits, rtol=1e-4, atol=1e-5)
    (want.logits * weights).sum().backward()
    assert_pool_grads_match(model, leaves, rtol=1e-4)
