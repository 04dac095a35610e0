"""export_peft: peft.PeftModel.from_pretrained loads it and computes what lorambo computes."""

import copy
import json
import warnings

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import (BertConfig, BertModel, DistilBertConfig, DistilBertForSequenceClassification, GPT2Config,
                          GPT2LMHeadModel)

import lorambo
import lorambo.adapters
from lorambo import configure_model, export_peft, lora_layers
from lorambo.adapters import peft_adapter_config


def _bert():
    torch.manual_seed(0)
    return BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=48, max_position_embeddings=32)).eval()


def _gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32)).eval()


def _randomise(model):
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B[:, : layer.rank].normal_(std=0.1)


def _hidden(model, ids):
    out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("build,ranks", [
    (_bert, {"encoder.layer.0.attention.self.query": 3, "encoder.layer.0.attention.self.value": 5,
             "encoder.layer.1.intermediate.dense": 2, "encoder.layer.1.output.dense": 0}),
    (_gpt2, {"transformer.h.0.attn.c_attn": 4, "transformer.h.1.mlp.c_fc": 2, "transformer.h.1.attn.c_proj": 6}),
])
def test_peft_loads_export_with_same_outputs(tmp_path, build, ranks):
    base = build()
    ours = configure_model(copy.deepcopy(base), ranks, alpha=8.0, use_rslora=False)
    _randomise(ours)
    lora_layers(ours)[next(iter(ranks))].set_rank(list(ranks.values())[0] + 1)  # scaling must survive growth
    export_peft(ours, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config == json.loads(json.dumps(peft_adapter_config(ours)))  # the same content, one name for it
    active = {n: l.rank for n, l in lora_layers(ours).items() if l.rank > 0}
    assert config["rank_pattern"] == active
    assert sorted(config["target_modules"]) == sorted(active)
    assert config["fan_in_fan_out"] is (build is _gpt2)  # GPT-2's Conv1D stores its weight [in, out]
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    # the rank-0 layer is left out of the file too, not written as empty tensors
    assert set(tensors) == {f"base_model.model.{n}.{pool}.weight" for n in active for pool in ("lora_A", "lora_B")}
    name = next(iter(active))
    layer = lora_layers(ours)[name]
    assert tensors[f"base_model.model.{name}.lora_A.weight"].shape == (active[name], layer.in_features)
    assert tensors[f"base_model.model.{name}.lora_B.weight"].shape == (layer.out_features, active[name])

    peft_model = PeftModel.from_pretrained(base, tmp_path).eval()
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(_hidden(peft_model, ids), _hidden(ours, ids), rtol=1e-5, atol=1e-5)


def test_nothing_to_export(tmp_path):
    model = configure_model(_bert(), {"encoder.layer.0.attention.self.query": 0})
    with pytest.raises(ValueError, match="rank > 0"):
        export_peft(model, tmp_path)


def test_one_name_per_thing_in_the_adapters_package():
    assert lorambo.adapters.peft_config is lorambo.peft_config  # a peft.LoraConfig to train with


def _distilbert_classifier():
    torch.manual_seed(0)
    cfg = DistilBertConfig(vocab_size=64, dim=32, n_layers=2, n_heads=2, hidden_dim=48, max_position_embeddings=32,
                           num_labels=3, dropout=0.0, attention_dropout=0.0, seq_classif_dropout=0.0)
    return DistilBertForSequenceClassification(cfg).double().eval()


def test_a_module_to_save_whose_name_ends_a_lora_target_is_refused_before_writing(tmp_path):
    """peft matches modules_to_save with a plain endswith: DistilBERT's "classifier" also takes its
    LoRA target "pre_classifier" (a default target), and PeftModel.from_pretrained raised
    "modules_to_save cannot be applied to modules of type lora.Linear" on the exported folder."""
    from peft import LoraConfig, get_peft_model

    with pytest.raises(TypeError, match="modules_to_save cannot be applied"):  # peft cannot hold it either
        get_peft_model(_distilbert_classifier(), LoraConfig(target_modules=["pre_classifier"],
                                                            modules_to_save=["classifier"]))
    model = configure_model(_distilbert_classifier(), 2, modules_to_save=["classifier"])
    assert "pre_classifier" in lora_layers(model)
    with pytest.raises(ValueError, match="module to save 'classifier' would also take the LoRA target 'pre_classifier'"):
        export_peft(model, tmp_path / "peft")
    assert not (tmp_path / "peft").exists()

    # what the message suggests: save pre_classifier whole; peft then computes what lorambo does
    model = configure_model(_distilbert_classifier(), 2, target_modules=["q_lin", "v_lin", "lin1"],
                            modules_to_save=["pre_classifier", "classifier"])
    _randomise(model)
    with torch.no_grad():
        for name in ("pre_classifier", "classifier"):
            for p in model.get_submodule(name).parameters():
                p.add_(torch.randn(p.shape, dtype=p.dtype, generator=torch.Generator().manual_seed(2)))
    export_peft(model, tmp_path / "peft")
    peft_model = PeftModel.from_pretrained(_distilbert_classifier(), tmp_path / "peft").eval()
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-12, atol=1e-12)


def test_different_dropouts_are_written_as_the_largest_with_a_warning(tmp_path):
    """peft's config has one lora_dropout: layers configured with 0.0 and 0.3 were written as 0.3
    without a word, so training the adapter in peft dropped out everywhere at 0.3."""
    model = _bert()
    configure_model(model, 2, target_modules=["query"], dropout=0.0)
    configure_model(model, 2, target_modules=["value"], dropout=0.3)
    with pytest.warns(UserWarning, match=r"export_peft: the layers' LoRA dropouts differ .*0\.0.*0\.3.*the largest, 0\.3"):
        export_peft(model, tmp_path / "a")
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["lora_dropout"] == 0.3
    same = _bert()
    configure_model(same, 2, target_modules=["query", "value"], dropout=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        export_peft(same, tmp_path / "b")
