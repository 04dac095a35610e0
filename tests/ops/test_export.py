"""``torch.export.export`` of LoRAMBoLinear layers on every CPU backend, with a dynamic batch and
sequence length, in eval mode and in train mode (dropout), and of the merged model, which has no
lorambo op left. Each program is run at other shapes than exported (1 included, which Dynamo would
specialise) and compared with a float64 reference that does not use lorambo."""

import copy

import pytest
import torch
from torch import nn
from torch.export import Dim
from transformers.pytorch_utils import Conv1D

import lorambo
from lorambo import LoRAMBoLinear

from cpu_backends import BACKENDS

SHAPES = [(4, 5, 12), (1, 1, 12), (3, 1, 12), (1, 6, 12)]


@pytest.fixture(autouse=True)
def reset_backend():
    yield
    lorambo.set_backend(None)


def _model():
    """Linear (rank 0: the op still runs) -> tanh -> Linear -> tanh -> Conv1D, float32, non-zero B."""
    torch.manual_seed(0)
    model = nn.Sequential(LoRAMBoLinear(nn.Linear(12, 10), rank=0, capacity=4), nn.Tanh(),
                          LoRAMBoLinear(nn.Linear(10, 10), rank=3, capacity=4, alpha=6.0), nn.Tanh(),
                          LoRAMBoLinear(Conv1D(6, 10), rank=4, capacity=4, alpha=2.0, dropout=0.5)).eval()
    with torch.no_grad():
        for layer in (model[0], model[2], model[4]):
            layer.lora_B[:, :layer.rank].normal_()
    return model


def _reference(model, x):
    """float64 ``x W^T + b + s (x A_r^T) B_r^T`` per layer, tanh between them."""
    h = x.double()
    with torch.no_grad():
        for i in (0, 2, 4):
            layer, r = model[i], model[i].rank
            weight = layer.weight.double() + layer.scaling * layer.lora_B[:, :r].double() @ layer.lora_A[:r].double()
            h = h @ weight.t() + layer.bias.double()
            if i < 4:
                h = torch.tanh(h)
    return h


def _export(model):
    example = torch.randn(2, 3, 12)
    return torch.export.export(model, (example,), dynamic_shapes=({0: Dim("batch"), 1: Dim("sequence")},))


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_exported_program_runs_other_batch_and_sequence_lengths(backend):
    lorambo.set_backend(backend)
    model = _model()
    program = _export(model).module()
    for shape in SHAPES:
        x = torch.randn(*shape)
        with torch.no_grad():
            torch.testing.assert_close(program(x).double(), _reference(model, x), rtol=1e-5, atol=1e-5,
                                       msg=lambda m: f"input {shape}\n{m}")


def test_the_merged_model_exports_without_lorambo_ops():
    model = _model()
    merged = lorambo.unload(copy.deepcopy(model), merge=True)
    exported = _export(merged)
    assert "lorambo" not in exported.graph_module.code
    program = exported.module()
    for shape in SHAPES:
        x = torch.randn(*shape)
        with torch.no_grad():
            torch.testing.assert_close(program(x).double(), _reference(model, x), rtol=1e-5, atol=1e-5,
                                       msg=lambda m: f"input {shape}\n{m}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_program_exported_in_train_mode_draws_a_fresh_dropout_mask_per_call(backend):
    lorambo.set_backend(backend)
    model = _model().train()  # only the last layer has dropout (p = 0.5)
    program = _export(model).module()
    x = torch.randn(3, 4, 12)
    with torch.no_grad():
        first, second = program(x), program(x)
    assert not torch.equal(first, second)  # no mask frozen into the program
    assert (first.double() - _reference(model, x)).abs().max() > 1e-3  # and it does drop
