"""The model-level functions refuse a ``model`` that is not an ``nn.Module`` (None, the
``(model, tokenizer)`` pair of ``load_minilm()``) with a TypeError naming the function and the
value, as the README's error table says, instead of an AttributeError from deep inside."""

import pytest
import torch
from torch import nn

import lorambo

CALLS = {
    "configure_model": lambda m, tmp: lorambo.configure_model(m, 2),
    "lora_layers": lambda m, tmp: lorambo.lora_layers(m),
    "unload": lambda m, tmp: lorambo.unload(m),
    "trainable_parameters": lambda m, tmp: lorambo.trainable_parameters(m),
    "print_trainable_parameters": lambda m, tmp: lorambo.print_trainable_parameters(m),
    "disable_adapter": lambda m, tmp: lorambo.disable_adapter(m).__enter__(),
    "save_adapter": lambda m, tmp: lorambo.save_adapter(m, tmp / "a.safetensors"),
    "load_adapter": lambda m, tmp: lorambo.load_adapter(m, tmp / "a.safetensors"),
    "export_peft": lambda m, tmp: lorambo.export_peft(m, tmp / "peft"),
    "import_peft": lambda m, tmp: lorambo.import_peft(m, tmp / "peft"),
}


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = lorambo.configure_model(nn.Sequential(nn.Linear(8, 8)), 2)
    lorambo.save_adapter(model, tmp_path / "a.safetensors")
    lorambo.export_peft(model, tmp_path / "peft")
    return tmp_path


@pytest.mark.parametrize("name", CALLS)
@pytest.mark.parametrize("bad", [None, (nn.Linear(2, 2), "tokenizer")], ids=["None", "tuple"])
def test_a_model_that_is_not_a_module_is_a_type_error(name, bad, saved):
    with pytest.raises(TypeError, match=rf"{name}: model must be a torch nn\.Module, got {type(bad).__name__}"):
        CALLS[name](bad, saved)


def test_unload_merge_must_be_a_bool():
    # before: merge="no" is truthy, so the adapters were merged in
    model = lorambo.configure_model(nn.Sequential(nn.Linear(8, 8)), 2)
    with pytest.raises(TypeError, match=r"unload: merge must be True or False, got 'no'"):
        lorambo.unload(model, merge="no")
    assert lorambo.lora_layers(model)  # nothing was changed
