"""A LoRAMBoLinear compiles as one graph inside and outside autocast.

Its forward asks whether the input's device type has autocast; torch 2.11's Dynamo cannot trace
``torch.amp.is_autocast_available`` (torch 2.13's can), so the answer must reach the graph as a
constant (lorambo.ops.compile_support.autocast_available).
"""

import torch

import lorambo


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
