"""``unload`` and ``unloaded_state_dict`` on a model wrapped by torch.compile or DDP after it was
configured. ``unload`` used to replace the layers and then fail (AttributeError: the compile
wrapper found the inner model's records through getattr but could not delete them there), or
under DDP leave every parameter frozen; ``unloaded_state_dict`` keyed the state under the
wrapper's prefix (``_orig_mod.`` / ``module.``), which loads into no plain model."""

import pytest
import torch
import torch.distributed as dist
from torch import nn
from transformers.pytorch_utils import Conv1D

from lorambo import configure_model, lora_layers, unload
from lorambo.integrations.fsdp import unloaded_state_dict
from lorambo.model.modules_to_save import modules_to_save


def _plain():
    return nn.Sequential(nn.Linear(8, 6), nn.Tanh(), Conv1D(5, 6), nn.Tanh(), nn.Linear(5, 3)).double()


def _float64_merged(model, x):
    """x through the adapted model with W + s B_r A_r written into each layer by hand."""
    h = x
    for module in model:
        if module in lora_layers(model).values():
            r = module.rank
            weight = module.weight.detach() + module.scaling * module.lora_B[:, :r].detach() @ module.lora_A[:r].detach()
            h = h @ weight.t() + module.bias.detach()
        else:
            h = module(h)
    return h


@pytest.fixture(params=["compile", "ddp"])
def wrap(request, tmp_path):
    if request.param == "ddp":
        dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
        yield nn.parallel.DistributedDataParallel
        dist.destroy_process_group()
    else:
        yield lambda model: torch.compile(model, backend="eager")


def _configured():
    model = configure_model(_plain(), ranks=2, target_modules=["0", "2"], capacity=4, alpha=3.0,
                            modules_to_save=["4"])
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B[:, :2].normal_()
        model[4].weight.add_(1.0)  # the trained head
    return model


def test_unload_of_a_wrapped_model_merges_and_restores_the_plain_model(wrap):
    model = _configured()
    x = torch.randn(4, 8, dtype=torch.float64)
    want = _float64_merged(model, x)
    wrapped = wrap(model)
    assert unload(wrapped, merge=True) is wrapped
    assert not lora_layers(model) and type(model[2]) is Conv1D
    assert all(p.requires_grad for p in model.parameters())
    assert modules_to_save(model) == []
    torch.testing.assert_close(model(x), want, rtol=1e-12, atol=1e-12)


def test_unloaded_state_dict_of_a_wrapped_model_loads_into_the_plain_model(wrap):
    model = _configured()
    x = torch.randn(4, 8, dtype=torch.float64)
    plain = _plain()
    plain.load_state_dict(unloaded_state_dict(wrap(model)))  # strict: the plain model's keys exactly
    torch.testing.assert_close(plain(x), _float64_merged(model, x), rtol=1e-12, atol=1e-12)
    assert len(lora_layers(model)) == 2  # the model itself stays adapted


def test_nested_wrappers_are_all_taken_off(tmp_path):
    """unwrap_model takes off every torch.compile and DDP layer, in any nesting (torch.compile of a
    compiled module compiles its forward: no such nesting)."""
    from lorambo.model.unwrap import unwrap_model

    model = _configured()
    compiled = lambda m: torch.compile(m, backend="eager")  # noqa: E731
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel
        for wrapped in (ddp(compiled(model)), compiled(ddp(model)), ddp(ddp(model))):
            assert unwrap_model(wrapped) is model
    finally:
        dist.destroy_process_group()
