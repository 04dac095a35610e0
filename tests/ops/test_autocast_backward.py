"""A backward called inside an autocast region runs in the dtypes of the forward, on every backend.

The usual case: a head kept in float32 inside ``torch.autocast(enabled=False)`` within an outer
autocast region, whose ``loss.backward()`` runs in the outer region. The compiled extension
raised "self and mat2 must have the same dtype, but got BFloat16 and Float" there, and the
PyTorch reference computed the gradients in bfloat16.
"""

import contextlib

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import lorambo
from lorambo.nn.lora_linear import LoRAMBoLinear

from cpu_backends import BACKENDS

# eager: the backends' autograd Functions; custom_op: the torch.library ops (TorchDispatchMode)
PATHS = {"eager": contextlib.nullcontext, "custom_op": lambda: FlopCounterMode(display=False)}


@pytest.mark.parametrize("create_graph", [False, True])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_forward_then_backward_inside_autocast_gives_float32_gradients(backend, path, create_graph):
    lorambo.set_backend(backend)
    layer = LoRAMBoLinear(torch.nn.Linear(24, 20), rank=3, capacity=4)
    with torch.no_grad():
        layer.lora_B[:, :3].normal_()
    layer.base_layer.weight.requires_grad_(True)
    x = torch.randn(2, 5, 24, requires_grad=True)
    leaves = (x, layer.base_layer.weight, layer.lora_A, layer.lora_B)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.autocast("cpu", enabled=False), PATHS[path]():
            y = layer(x)
        grad_y = torch.randn_like(y)
        grads = torch.autograd.grad(y, leaves, grad_y, create_graph=create_graph)
    x64, w64, a64, b64 = (t.detach().double().requires_grad_() for t in leaves)
    y64 = x64 @ w64.t() + layer.bias.double() + layer.scaling * (x64 @ a64[:3].t()) @ b64[:, :3].t()
    want = torch.autograd.grad(y64, (x64, w64, a64, b64), grad_y.double())
    assert y.dtype == torch.float32
    for name, got, ref in zip(("x", "weight", "lora_A", "lora_B"), grads, want):
        assert got.dtype == torch.float32, name
        scale = float(ref.abs().max())  # float32 rounding of sums of |terms| up to that; bf16's is ~4e-3 of it
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6 * scale, msg=name)
