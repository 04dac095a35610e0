"""Batched per-layer reductions against per-tensor float64 loops, on the PyTorch path and on
the path ``auto`` picks (the compiled extension on CPU when it is built)."""

import pytest
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
    calls, norm_calls = [], []
    if ext_ops.available():
        real, real_norm = ext_ops.multi_dot, ext_ops.multi_sq_norm
        monkeypatch.setattr(ext_ops, "multi_dot", lambda *a, **k: calls.append(1) or real(*a, **k))
        monkeypatch.setattr(ext_ops, "multi_sq_norm", lambda *a, **k: norm_calls.append(1) or real_norm(*a, **k))
    xs = [torch.randn(2, 9), torch.randn(2, 3, 3)]
    per_layer_dots(xs, xs)
    per_layer_sq_norms(xs)
    expected = backend == "auto" and ext_ops.available()
    assert use_compiled_multi_tensor(xs) == expected
    assert bool(calls) == expected and bool(norm_calls) == expected
    # outside autograd only: a tensor that requires grad keeps the differentiable PyTorch path
    assert not use_compiled_multi_tensor([torch.randn(3, requires_grad=True)])


def test_auto_keeps_tensors_off_the_cpu_and_non_contiguous_ones_on_the_pytorch_path(backend):
    cpu = [torch.randn(2, 3)]
    expected = backend == "auto" and ext_ops.available()
    assert use_compiled_multi_tensor(cpu) == expected
    assert not use_compiled_multi_tensor(cpu + [torch.empty(2, 3, device="meta")]) or backend == "ext"
    assert not use_compiled_multi_tensor(cpu + [torch.randn(3, 2).t()]) or backend == "ext"


PATHS = ["torch", "ext", "triton"]


def _on_path(path):
    """Select one path of per_layer_dots (the Triton kernels under the interpreter on CPU)."""
    import lorambo
    from lorambo.ops.sketch import set_sketch_backend

    if path == "ext" and not ext_ops.available():
        raise AssertionError("the extension is not built: build it to test its path")
    lorambo.set_backend("torch" if path == "torch" else None)
    set_sketch_backend("triton" if path == "triton" else "torch")


@pytest.fixture
def restore_paths():
    import lorambo
    from lorambo.ops.sketch import set_sketch_backend

    yield
    lorambo.set_backend(None)
    set_sketch_backend(None)


@pytest.mark.parametrize("path", PATHS)
def test_per_layer_dots_takes_one_dimensional_rows_on_every_path(path, restore_paths):
    """A (P,) tensor is P rows of one element on every path; the PyTorch loop raised an
    IndexError on it (flatten(1)) and the Triton kernels took it as one row of P."""
    gen = torch.Generator().manual_seed(1)
    shapes = [(4,), (4, 3), (4, 2, 5)]
    xs = [torch.randn(s, generator=gen) for s in shapes]
    ys = [torch.randn(s, generator=gen) for s in shapes]
    want = torch.stack([(x.double().reshape(4, -1) * y.double().reshape(4, -1)).sum(1) for x, y in zip(xs, ys)], 1)
    _on_path(path)
    from lorambo.ops.sketch import use_sketch_kernels

    assert (use_sketch_kernels(xs), use_compiled_multi_tensor(xs)) == {
        "torch": (False, False), "ext": (False, True), "triton": (True, True)}[path]
    got = per_layer_dots(xs, ys)
    assert got.dtype == torch.float64 and got.shape == (4, 3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("xs_shapes, ys_shapes, message", [
    ([()], [()], r"per_layer_dots: xs\[0\] is 0-d"),
    ([(3, 4)], [(3, 2, 2)], r"per_layer_dots: xs\[0\] has shape \[3, 4\] but ys\[0\] has shape \[3, 2, 2\]"),
    ([(3, 4), (2, 6)], [(3, 4), (2, 6)], r"per_layer_dots: xs\[1\] has shape \[2, 6\] but xs\[0\] has 3 rows"),
])
def test_per_layer_dots_refuses_the_same_inputs_alike_on_every_path(path, xs_shapes, ys_shapes, message,
                                                                    restore_paths):
    xs, ys = [torch.randn(s) for s in xs_shapes], [torch.randn(s) for s in ys_shapes]
    _on_path(path)
    with pytest.raises(ValueError, match=message):
        per_layer_dots(xs, ys)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shapes, rows", [([(0, 3), (0, 2, 2)], 0), ([(3, 0), (3, 4)], 3), ([], 0)])
def test_per_layer_dots_takes_empty_inputs_on_every_path(path, shapes, rows, restore_paths):
    """No rows, a layer of no elements, or no layers give the (P, L) zeros a loop of sums gives;
    the compiled path refused 0 rows with a RuntimeError."""
    gen = torch.Generator().manual_seed(2)
    xs = [torch.randn(s, generator=gen) for s in shapes]
    ys = [torch.randn(s, generator=gen) for s in shapes]
    want = torch.tensor([[float((x[p].double() * y[p].double()).sum()) for x, y in zip(xs, ys)]
                         for p in range(rows)], dtype=torch.float64).reshape(rows, len(shapes))
    _on_path(path)
    got = per_layer_dots(xs, ys)
    assert got.dtype == torch.float64 and got.shape == (rows, len(shapes))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shapes", [[(0, 3), (2, 2)], [(4,), (0,)], []])
def test_per_layer_sq_norms_takes_empty_inputs_on_every_path(path, shapes, restore_paths):
    gen = torch.Generator().manual_seed(3)
    xs = [torch.randn(s, generator=gen) for s in shapes]
    want = torch.tensor([float(x.double().square().sum()) for x in xs], dtype=torch.float64)
    _on_path(path)
    got = per_layer_sq_norms(xs)
    assert got.dtype == torch.float64 and got.shape == (len(shapes),)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
