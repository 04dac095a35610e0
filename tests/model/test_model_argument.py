"""The model-level functions refuse a ``model`` that is not an ``nn.Module`` (None, the
``(model, tokenizer)`` pair of ``load_minilm()``) with a TypeError naming the function and the
value, as the error table of docs/guarantees.md says, instead of an AttributeError from deep inside."""

import pytest
import torch
from torch import nn

import lorambo
from lorambo import sensitivity

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
    "LoRAMBoOptimizer": lambda m, tmp: lorambo.LoRAMBoOptimizer(m, total_budget=100),
    "gradient_sensitivity": lambda m, tmp: sensitivity.gradient_sensitivity(m, _loss, [_x()]),
    "targets_without_gradient": lambda m, tmp: sensitivity.targets_without_gradient(m, _loss, _x()),
    "data_covariance": lambda m, tmp: sensitivity.data_covariance(m, _loss, [_x()]),
    "hessian_trace": lambda m, tmp: sensitivity.hessian_trace(m, _loss, [_x()], num_probes=2),
    "hessian_opnorm": lambda m, tmp: sensitivity.hessian_opnorm(m, _loss, [_x()], num_iters=2),
    "FisherProxy": lambda m, tmp: sensitivity.FisherProxy(m),
    "ablation_scores": lambda m, tmp: sensitivity.ablation_scores(m, _loss, [_x()]),
    "AdaLoRAImportance": lambda m, tmp: sensitivity.AdaLoRAImportance(m),
    "find_targets": lambda m, tmp: sensitivity.find_targets(m),
}


def _loss(model, batch):
    return model(batch).pow(2).mean()


def _x():
    return torch.randn(3, 8)


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


PATH_CALLS = {
    "save_adapter": lambda m, p: lorambo.save_adapter(m, p),
    "load_adapter": lambda m, p: lorambo.load_adapter(m, p),
    "export_peft": lambda m, p: lorambo.export_peft(m, p),
    "import_peft": lambda m, p: lorambo.import_peft(m, p),
}


@pytest.mark.parametrize("name", PATH_CALLS)
def test_a_path_that_is_not_a_name_is_refused(name, tmp_path, monkeypatch):
    # before: None gave pathlib's "expected str, bytes or os.PathLike object, not NoneType", and ""
    # (an unset variable) meant the current directory: save_adapter wrote ./adapter.safetensors
    model = lorambo.configure_model(nn.Sequential(nn.Linear(8, 8)), 2)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TypeError, match=rf"{name}: path must be a file or folder name \(str or os.PathLike\), "
                                        r"got NoneType None"):
        PATH_CALLS[name](model, None)
    with pytest.raises(ValueError, match=rf"{name}: path is empty \(use '\.' for the current directory\)"):
        PATH_CALLS[name](model, "")
    assert not any(tmp_path.iterdir())
