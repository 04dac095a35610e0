"""Batched per-layer reductions against per-tensor float64 loops, on the PyTorch path and on
the path ``auto`` picks (the compiled extension on CPU when it is built)."""

import torch

from lorambo.ext import ops as ext_ops
from lorambo.ops.backend import use_compiled_multi_tensor
from lorambo.sensitivity.reductions import per_layer_dots, per_layer_sq_norms


def test_per_layer_dots_and_norms_match_loops(backend):
    shapes = [(3, 5, 4), (3, 7), (3, 2, 2, 2)]
    xs = [torch.randn(s) for s in shapes]
    ys = [torch.randn(s) for s in shapes]
    got = per_layer_dots(xs, ys)
    want = torch.tensor([[float((x[p].double() * y[p].double()).sum()) for x, y in zip(xs, ys)] for p in range(3)],
                        dtype=torch.float64)
    assert got.dtype == torch.float64 and got.shape == (3, 3)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    mixed = [torch.randn(6, 5), torch.randn(4).to(torch.bfloat16), torch.randn(2, 3, dtype=torch.float64)]
    want = torch.tensor([float(x.double().square().sum()) for x in mixed], dtype=torch.float64)
    got = per_layer_sq_norms(mixed)
    assert got.dtype == torch.float64 and got.shape == (3,)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_auto_runs_the_compiled_reductions_on_cpu_exactly_when_built(backend, monkeypatch):
    calls = []
    if ext_ops.available():
        real = ext_ops.multi_dot
        monkeypatch.setattr(ext_ops, "multi_dot", lambda *a, **k: calls.append(1) or real(*a, **k))
    xs = [torch.randn(2, 9), torch.randn(2, 3, 3)]
    per_layer_dots(xs, xs)
    expected = backend == "auto" and ext_ops.available()
    assert use_compiled_multi_tensor(xs) == expected
    assert bool(calls) == expected
    # outside autograd only: a tensor that requires grad keeps the differentiable PyTorch path
    assert not use_compiled_multi_tensor([torch.randn(3, requires_grad=True)])


def test_auto_keeps_tensors_off_the_cpu_and_non_contiguous_ones_on_the_pytorch_path(backend):
    cpu = [torch.randn(2, 3)]
    expected = backend == "auto" and ext_ops.available()
    assert use_compiled_multi_tensor(cpu) == expected
    assert not use_compiled_multi_tensor(cpu + [torch.empty(2, 3, device="meta")]) or backend == "ext"
    assert not use_compiled_multi_tensor(cpu + [torch.randn(3, 2).t()]) or backend == "ext"
