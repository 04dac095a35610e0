"""configure_model on a sequence classifier without its head in modules_to_save freezes the freshly
initialised head (training moves the adapters only and the head stays random), so it warns
once, naming the head and the modules_to_save that trains it."""

import warnings

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification, RobertaConfig, RobertaForSequenceClassification

import lorambo
from lorambo import configure_model, load_adapter, save_adapter
from lorambo.model.frozen_heads import FrozenHeadWarning


def _bert():
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                                    num_attention_heads=4, intermediate_size=48,
                                                    max_position_embeddings=32, num_labels=3))


def _roberta():
    torch.manual_seed(0)
    return RobertaForSequenceClassification(RobertaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                                          num_attention_heads=2, intermediate_size=24,
                                                          max_position_embeddings=24, pad_token_id=1, num_labels=2))


def _head_warnings(call):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
    return [str(w.message) for w in caught if issubclass(w.category, FrozenHeadWarning)]


@pytest.mark.parametrize("build,model_class", [(_bert, "BertForSequenceClassification"),
                                               (_roberta, "RobertaForSequenceClassification")])
def test_a_frozen_classifier_head_is_named_once_with_the_fix(build, model_class):
    model = build()
    got = _head_warnings(lambda: configure_model(model, 2, target_modules=["query", "value"]))
    # RoBERTa's head holds dense and out_proj: the head is named, not its layers
    assert got == [f"configure_model: the classification head 'classifier' of {model_class} is frozen (neither a LoRA "
                   "target nor in modules_to_save), so training leaves it as it is; a head that from_pretrained "
                   "initialised at random (a new num_labels) stays random. Pass modules_to_save=['classifier'] to "
                   "configure_model (or to LoRAMBoOptimizer(...), whose configure() passes it on) to train it, or "
                   "ignore this warning for a head that is already trained"]
    assert not any(p.requires_grad for p in model.classifier.parameters())
    # re-ranking the adapted model does not repeat it; the fix it names makes the head trainable
    assert _head_warnings(lambda: configure_model(model, {n: 1 for n in lorambo.lora_layers(model)})) == []
    assert _head_warnings(lambda: configure_model(model, {n: 1 for n in lorambo.lora_layers(model)},
                                                  modules_to_save=["classifier"])) == []
    assert all(p.requires_grad for p in model.classifier.parameters())


def test_no_warning_with_the_head_to_save_or_when_loading_an_adapter(tmp_path):
    model = _bert()
    configured = _head_warnings(lambda: configure_model(model, 2, target_modules=["query"],
                                                        modules_to_save=["classifier"]))
    assert configured == []
    save_adapter(model, tmp_path / "with_head")
    plain = _bert()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FrozenHeadWarning)
        configure_model(plain, 2, target_modules=["query"])
    save_adapter(plain, tmp_path / "without_head")
    # loading restores what the file holds: a head trained without modules_to_save stays as it was
    for folder in ("with_head", "without_head"):
        assert _head_warnings(lambda folder=folder: load_adapter(_bert(), tmp_path / folder)) == []


def test_a_head_inside_a_head_is_named_by_the_outer_one_only():
    """A frozen ``classifier`` (below the model's top level) holding a layer named ``score``: one
    head, the outermost, named by its full path."""
    torch.manual_seed(0)
    head = nn.ModuleDict({"score": nn.Linear(4, 2)})
    model = nn.ModuleDict({"body": nn.Linear(4, 4), "task": nn.ModuleDict({"classifier": head})})
    got = _head_warnings(lambda: configure_model(model, 2, target_modules=["body"]))
    assert len(got) == 1 and "the classification head 'task.classifier' of ModuleDict" in got[0]
    assert "score" not in got[0]
