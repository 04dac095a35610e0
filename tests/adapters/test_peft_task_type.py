"""export_peft writes the peft task_type of a transformers model, so AutoPeftModelFor<Task> loads
the folder (base model from base_model_name_or_path, a local folder here) and computes what
lorambo computes; a model no single auto class builds keeps task_type null."""

import json

import pytest
import torch
from peft import (AutoPeftModel, AutoPeftModelForCausalLM, AutoPeftModelForFeatureExtraction,
                  AutoPeftModelForQuestionAnswering, AutoPeftModelForSeq2SeqLM,
                  AutoPeftModelForSequenceClassification, AutoPeftModelForTokenClassification, PeftModel)
from transformers import (BertConfig, BertForQuestionAnswering, BertForTokenClassification, BertModel, GPT2Config,
                          GPT2ForSequenceClassification, GPT2LMHeadModel, LlamaForCausalLM, T5Config,
                          T5ForConditionalGeneration)

from lorambo import configure_model, export_peft, lora_layers
from tests.model.tiny_causal_lms import tiny_llama

_BERT = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
             max_position_embeddings=32)
_GPT2 = dict(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32, pad_token_id=0)


def _t5():
    return T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2,
                                               num_heads=4, decoder_start_token_id=0))


CASES = [  # (build, task_type, AutoPeftModel class)
    (tiny_llama, "CAUSAL_LM", AutoPeftModelForCausalLM),
    (lambda: GPT2LMHeadModel(GPT2Config(**_GPT2)), "CAUSAL_LM", AutoPeftModelForCausalLM),
    (lambda: GPT2ForSequenceClassification(GPT2Config(num_labels=3, **_GPT2)), "SEQ_CLS",
     AutoPeftModelForSequenceClassification),
    (lambda: BertForTokenClassification(BertConfig(num_labels=3, **_BERT)), "TOKEN_CLS",
     AutoPeftModelForTokenClassification),
    (lambda: BertForQuestionAnswering(BertConfig(**_BERT)), "QUESTION_ANS", AutoPeftModelForQuestionAnswering),
    (_t5, "SEQ_2_SEQ_LM", AutoPeftModelForSeq2SeqLM),
    (lambda: BertModel(BertConfig(**_BERT)), "FEATURE_EXTRACTION", AutoPeftModelForFeatureExtraction),
]


def _outputs(model, ids):
    kwargs = {"decoder_input_ids": ids[:, :3]} if model.config.is_encoder_decoder else {}
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
    if hasattr(out, "start_logits"):
        return torch.cat([out.start_logits, out.end_logits], -1)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _exported(tmp_path, build):
    """A lorambo model on a base saved to (and loaded from) a local folder, exported to peft."""
    torch.manual_seed(0)
    build().save_pretrained(tmp_path / "base")
    model = type(build()).from_pretrained(tmp_path / "base").eval()
    configure_model(model, 3)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B[:, :layer.rank].normal_(std=0.1)
    export_peft(model, tmp_path / "peft")
    return model, json.loads((tmp_path / "peft" / "adapter_config.json").read_text())


@pytest.mark.parametrize("build,task,auto", CASES, ids=[c[1] + str(i) for i, c in enumerate(CASES)])
def test_auto_peft_model_loads_the_export_with_the_same_outputs(tmp_path, monkeypatch, build, task, auto):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # peft looks for a tokenizer on the hub otherwise
    model, config = _exported(tmp_path, build)
    assert config["task_type"] == task
    assert config["base_model_name_or_path"] == str(tmp_path / "base")
    loaded = auto.from_pretrained(tmp_path / "peft").eval()
    ids = torch.randint(1, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = _outputs(model, ids), _outputs(loaded, ids)
        base = _outputs(type(build()).from_pretrained(tmp_path / "base").eval(), ids)
    assert not torch.allclose(want, base, atol=1e-4)  # the adapters change the outputs
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


class MyCausalLM(LlamaForCausalLM):
    """A user subclass: no transformers auto class builds it."""


def test_a_model_no_auto_class_builds_keeps_task_type_null(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, config = _exported(tmp_path, lambda: MyCausalLM(tiny_llama().config))
    assert config["task_type"] is None
    with pytest.raises(ValueError, match="Cannot infer the auto class"):
        AutoPeftModel.from_pretrained(tmp_path / "peft")
    loaded = PeftModel.from_pretrained(MyCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "peft").eval()
    ids = torch.randint(1, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(_outputs(loaded, ids), _outputs(model, ids), rtol=1e-5, atol=1e-5)


def test_a_task_head_peft_would_match_beside_a_lora_target_keeps_task_type_null(tmp_path, monkeypatch):
    """DistilBERT's SEQ_CLS: peft's task class adds "classifier" to modules_to_save, which by the
    end of the name also takes the LoRA target "pre_classifier": null keeps the folder loadable."""
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    build = lambda: DistilBertForSequenceClassification(DistilBertConfig(  # noqa: E731
        vocab_size=64, dim=32, n_layers=2, n_heads=4, hidden_dim=48, max_position_embeddings=32, num_labels=3))
    model, config = _exported(tmp_path, build)
    assert "pre_classifier" in lora_layers(model)
    assert config["task_type"] is None
    loaded = PeftModel.from_pretrained(type(model).from_pretrained(tmp_path / "base"), tmp_path / "peft").eval()
    ids = torch.randint(1, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(_outputs(loaded, ids), _outputs(model, ids), rtol=1e-5, atol=1e-5)
