"""``torch.jit.trace`` of LoRAMBoLinear layers on every CPU backend.

The trace used to hold the traced input's shape as constants (the op's output reshape), so it
failed on any other batch or sequence length; on the triton backend tracing itself failed (the
launcher got the traced sizes as tensors); and the reference op's dropout seed was a constant
of the trace, so every call dropped the same elements. Under tracing the layers now call the
backend's custom op, which the trace records as one node.
"""

import copy
import io

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import lorambo
from lorambo import LoRAMBoLinear

from cpu_backends import BACKENDS


def _model():
    """Linear -> tanh -> Conv1D, both adapted, with non-zero B; float32 (every backend runs it)."""
    model = nn.Sequential(LoRAMBoLinear(nn.Linear(12, 10), rank=3, capacity=4, alpha=6.0), nn.Tanh(),
                          LoRAMBoLinear(Conv1D(6, 10), rank=4, capacity=4, alpha=2.0, dropout=0.5))
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.lora_B[:, :layer.rank].normal_()
    return model


def _reference(model, x):
    """float64 ``x W^T + b + s (x A_r^T) B_r^T`` per layer, with autograd for the pool gradients."""
    h = x.double()
    pools = []
    for layer in (model[0], model[2]):
        a = layer.lora_A.detach().double().requires_grad_()
        b = layer.lora_B.detach().double().requires_grad_()
        pools += [a, b]
        r = layer.rank
        h = (h @ layer.weight.detach().double().t() + layer.bias.detach().double()
             + layer.scaling * (h @ a[:r].t()) @ b[:, :r].t())
        if layer is model[0]:
            h = torch.tanh(h)
    return h, pools


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_trace_runs_other_shapes_with_the_adapter_and_its_gradients(backend):
    lorambo.set_backend(backend)
    model = _model().eval()
    traced = torch.jit.trace(model, (torch.randn(2, 3, 12),))
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    x = torch.randn(4, 5, 12)  # another batch and sequence length than traced
    want, pools = _reference(model, x)
    torch.testing.assert_close(loaded(x).double(), want, rtol=1e-5, atol=1e-5)
    out = traced(x)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    out.double().square().sum().backward()
    want.square().sum().backward()
    got = [g for layer in (model[0], model[2]) for g in (layer.lora_A.grad, layer.lora_B.grad)]
    for g, p in zip(got, pools):
        torch.testing.assert_close(g.double(), p.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_trace_in_train_mode_draws_a_fresh_dropout_mask_per_call(backend):
    lorambo.set_backend(backend)
    model = _model().train()
    x = torch.randn(3, 12)
    traced = torch.jit.trace(model, (x,), check_trace=False)  # dropout: the check's rerun differs
    with torch.no_grad():
        first, second = traced(x), traced(x)
        no_dropout = _reference(model, x)[0]
    assert not torch.equal(first, second)
    # the first layer has no dropout: only the second layer's LoRA branch differs between calls
    assert (first.double() - no_dropout).abs().max() > 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_traced_gpt2_runs_other_shapes(backend):
    """GPT-2 adds the Python number 0 to its position ids; the trace pools that constant with an
    equal tensor constant, and it runs as an int: a seed made by torch.tensor(0) reached the op
    as an int ("Expected a value of type 'Tensor' for argument 'seed'")."""
    from transformers import GPT2Config, GPT2LMHeadModel

    lorambo.set_backend(backend)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4, n_positions=32,
                                      bos_token_id=0, eos_token_id=63, use_cache=False)).eval()
    model = lorambo.configure_model(copy.deepcopy(base), 2, capacity=4, alpha=4.0).eval()
    reference = copy.deepcopy(base).double()  # float64, W + s B_r A_r written in (Conv1D: [in, out])
    with torch.no_grad():
        for name, layer in lorambo.lora_layers(model).items():
            layer.lora_B[:, :2].normal_()
            delta = layer.scaling * layer.lora_B[:, :2].double() @ layer.lora_A[:2].double()
            reference.get_submodule(name).weight += delta.t()
    traced = torch.jit.trace(model, (torch.randint(0, 64, (2, 7)),), strict=False)
    ids = torch.randint(0, 64, (3, 11))
    with torch.no_grad():
        torch.testing.assert_close(traced(ids)["logits"].double(), reference(ids).logits, rtol=1e-4, atol=1e-4)
