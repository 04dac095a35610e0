"""A LoRAMBoLinear compiles as one graph inside and outside autocast.

Its forward asks whether the input's device type has autocast; torch 2.11's Dynamo cannot trace
``torch.amp.is_autocast_available`` (torch 2.13's can), so the answer must reach the graph as a
constant (lorambo.ops.compile_support.autocast_available).
"""

import pytest
import torch

import lorambo
from lorambo.ext import loader as ext_loader


def test_fullgraph_compile_with_and_without_autocast_matches_eager():
    torch.manual_seed(0)
    torch._dynamo.reset()
    layer = lorambo.LoRAMBoLinear(torch.nn.Linear(12, 10), rank=3, capacity=4)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(5, 12)
    compiled = torch.compile(layer, backend="eager", fullgraph=True)  # a graph break raises
    torch.testing.assert_close(compiled(x), layer(x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = compiled(x), layer(x)
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("lorambo_backend", [
    "torch",
    pytest.param("ext", marks=pytest.mark.skipif(ext_loader.load() is None, reason="extension not built"))])
@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_compiled_float32_forward_then_backward_inside_autocast_gives_float32_gradients(compile_backend,
                                                                                       lorambo_backend):
    """The backward of a compiled model runs the traced backward graph; the check that turns
    autocast off in the backward ran once, while tracing (outside autocast), so the reference's
    products computed the gradients in bfloat16 (torch backend; eager was right)."""
    lorambo.set_backend(lorambo_backend)
    torch._dynamo.reset()
    layer = lorambo.LoRAMBoLinear(torch.nn.Linear(24, 20), rank=3, capacity=4)
    with torch.no_grad():
        layer.lora_B[:, :3].normal_()
    layer.base_layer.weight.requires_grad_(True)
    x = torch.randn(2, 5, 24, requires_grad=True)
    leaves = (x, layer.base_layer.weight, layer.lora_A, layer.lora_B)
    y = torch.compile(layer, backend=compile_backend, fullgraph=True)(x)
    grad_y = torch.randn_like(y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        grads = torch.autograd.grad(y, leaves, grad_y)
    x64, w64, a64, b64 = (t.detach().double().requires_grad_() for t in leaves)
    y64 = x64 @ w64.t() + layer.bias.double() + layer.scaling * (x64 @ a64[:3].t()) @ b64[:, :3].t()
    want = torch.autograd.grad(y64, (x64, w64, a64, b64), grad_y.double())
    for name, got, ref in zip(("x", "weight", "lora_A", "lora_B"), grads, want):
        assert got.dtype == torch.float32, name
        scale = float(ref.abs().max())  # float32 rounding of sums of |terms| up to that; bf16's is ~4e-3 of it
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6 * scale, msg=name)
