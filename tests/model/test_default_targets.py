"""Default targets are peft's "all-linear" (computed by peft itself here), minus pooler layers."""

import pytest
from peft import LoraConfig
from peft.tuners.tuners_utils import _maybe_include_all_linear_layers
from transformers import (BertConfig, BertForSequenceClassification, BertModel, GPT2Config,
                          GPT2LMHeadModel)

from lorambo import configure_model, lora_layers
from lorambo.model import default_targets


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
