"""`lorambo.ops.sketch`: which path it picks for the per-layer statistics, what it refuses, and
LayerProducts against float64 products (the kernels under the Triton interpreter on CPU)."""

from types import SimpleNamespace

import pytest
import torch

from lorambo.ops import sketch


@pytest.fixture(autouse=True)
def restore_backend(monkeypatch):
    monkeypatch.delenv("LORAMBO_SKETCH", raising=False)
    yield
    sketch.set_sketch_backend(None)


@pytest.mark.parametrize("name", ["nope", "cuda", ""])
def test_unknown_backend_is_refused_by_name_and_by_environment(name, monkeypatch):
    with pytest.raises(ValueError, match=rf"unknown sketch backend '{name}' from set_sketch_backend"):
        sketch.set_sketch_backend(name)
    assert sketch.get_sketch_backend() == "auto"
    monkeypatch.setenv("LORAMBO_SKETCH", name)
    with pytest.raises(ValueError, match=rf"unknown sketch backend '{name}' from \$LORAMBO_SKETCH"):
        sketch.get_sketch_backend()


def test_backend_names_are_case_and_space_insensitive(monkeypatch):
    sketch.set_sketch_backend(" Torch ")
    assert sketch.get_sketch_backend() == "torch"
    sketch.set_sketch_backend(None)
    monkeypatch.setenv("LORAMBO_SKETCH", "TRITON")
    assert sketch.get_sketch_backend() == "triton"


@pytest.mark.parametrize("requested, want", [("torch", False), ("auto", True), ("triton", True)])
def test_choice_on_tensors_the_kernels_could_take(requested, want, monkeypatch):
    """CUDA tensors the kernels accept: 'torch' still keeps the PyTorch loop."""
    monkeypatch.setattr(sketch, "_kernels_unavailable", lambda tensors: None)
    cuda = [SimpleNamespace(device=torch.device("cuda"))] * 2
    sketch.set_sketch_backend(requested)
    assert sketch.use_sketch_kernels(cuda) is want
    assert sketch.use_sketch_kernels([]) is False


def test_tensors_that_require_grad_keep_the_loop_unless_grad_is_off():
    """The kernels are not differentiable: 'triton' refuses a tensor that requires grad while
    autograd records, and takes it under no_grad."""
    x = torch.randn(3, 4, requires_grad=True)
    sketch.set_sketch_backend("triton")
    with pytest.raises(RuntimeError, match=r"cannot run: a tensor requires grad"):
        sketch.use_sketch_kernels([x.detach(), x])
    with torch.no_grad():
        assert sketch.use_sketch_kernels([x]) is True


def test_auto_keeps_cpu_tensors_on_the_pytorch_loop_and_triton_says_why_not():
    x = torch.randn(3, 4, dtype=torch.float64)
    assert sketch.use_sketch_kernels([x]) is False
    sketch.set_sketch_backend("triton")
    with pytest.raises(RuntimeError, match=r"sketch backend 'triton' was requested but cannot run: "
                                           r"a tensor has dtype torch.float64"):
        sketch.use_sketch_kernels([x])


def _pairs(gen, dtype=torch.float32):
    # layer 0: two captured calls (G_0 sums both), layer 1: one
    return [[(torch.randn(5, 4, generator=gen).to(dtype), torch.randn(5, 3, generator=gen).to(dtype)),
             (torch.randn(2, 4, generator=gen).to(dtype), torch.randn(2, 3, generator=gen).to(dtype))],
            [(torch.randn(6, 2, generator=gen).to(dtype), torch.randn(6, 7, generator=gen).to(dtype))]]


@pytest.mark.parametrize("path", ["torch", "triton"])
def test_layer_products_of_layers_with_several_calls_take_any_probe_buffer(path):
    """float64 or strided probes: the kernel path converts them, the loop sums every call."""
    gen = torch.Generator().manual_seed(3)
    pairs = _pairs(gen)
    sketch.set_sketch_backend(path)
    prod = sketch.LayerProducts(pairs, [4, 2], [3, 7], p=3)
    assert prod.kernels == (path == "triton")
    # ``dtype`` is the PyTorch loop's working dtype; the kernels work in fp32
    want_dtype = torch.float32 if path == "triton" else torch.float64
    assert sketch.LayerProducts(pairs, [4, 2], [3, 7], p=3, dtype=torch.float64).dtype == want_dtype
    grams = [sum(dy.double().T @ x.double() for x, dy in ps) for ps in pairs]
    for adjoint in (False, True):
        v = torch.randn(2 * prod.numel(not adjoint), dtype=torch.float64, generator=gen)[::2]
        got = prod.apply(v, adjoint)
        assert got.shape == (prod.numel(adjoint),)
        src = prod.blocks(v, "out" if adjoint else "in")
        for l, g in enumerate(grams):
            want = (g.T if adjoint else g) @ src[l]
            torch.testing.assert_close(prod.blocks(got, "in" if adjoint else "out")[l].double(), want,
                                       rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("p", [1, 64])
def test_layer_products_take_one_to_64_columns(p):
    gen = torch.Generator().manual_seed(4)
    pairs = _pairs(gen, torch.float64)
    prod = sketch.LayerProducts(pairs, [4, 2], [3, 7], p=p, dtype=torch.float64)
    v = torch.randn(prod.numel(False), dtype=torch.float64, generator=gen)
    assert prod.numel() == prod.numel(False) == (3 + 7) * p  # the output side by default
    g0 = sum(dy.T @ x for x, dy in pairs[0])
    torch.testing.assert_close(prod.blocks(prod.apply(v), "out")[0], g0 @ prod.blocks(v, "in")[0])


@pytest.mark.parametrize("kwargs, match", [
    (dict(p=0), r"p=0 columns \(1\.\.64\)"),
    (dict(p=65), r"p=65 columns \(1\.\.64\)"),
    (dict(in_features=[4]), r"2 pair lists for 1 / 2 layer sizes"),
    (dict(out_features=[3, 7, 1]), r"2 pair lists for 2 / 3 layer sizes"),
])
def test_layer_products_refuse_bad_sizes(kwargs, match):
    args = dict(pairs=_pairs(torch.Generator().manual_seed(5)), in_features=[4, 2], out_features=[3, 7], p=2)
    with pytest.raises(ValueError, match=match):
        sketch.LayerProducts(**{**args, **kwargs})


def test_pytorch_path_needs_explicit_probes():
    prod = sketch.LayerProducts(_pairs(torch.Generator().manual_seed(6)), [4, 2], [3, 7], p=2)
    with pytest.raises(ValueError, match="PyTorch path needs explicit probes"):
        prod.apply(None)


def test_row_dots_groups_dtypes_and_takes_a_1d_tensor_as_one_row():
    """float64 (P, L) with P the most rows of any tensor; a 1-D tensor is one row (its dot in
    row 0, zeros below), the others fill their rows."""
    gen = torch.Generator().manual_seed(7)
    xs = [torch.randn(5, generator=gen), torch.randn(3, 2, 4, generator=gen).to(torch.bfloat16),
          torch.randn(2, 6, generator=gen)]
    ys = [torch.randn(x.shape, generator=gen) for x in xs]
    sketch.set_sketch_backend("triton")
    got = sketch.row_dots(xs, ys)
    want = torch.zeros(3, 3, dtype=torch.float64)
    want[0, 0] = (xs[0].double() * ys[0].double()).sum()
    want[:, 1] = (xs[1].double() * ys[1].to(torch.bfloat16).double()).reshape(3, -1).sum(1)
    want[:2, 2] = (xs[2].double() * ys[2].double()).sum(1)
    assert got.dtype == torch.float64 and got.shape == (3, 3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    only_1d = sketch.row_dots([xs[0]])
    torch.testing.assert_close(only_1d, xs[0].double().square().sum().reshape(1, 1), rtol=1e-5, atol=1e-5)


def test_row_dots_of_strided_tensors_on_the_kernels():
    """Transposed (non-contiguous) tensors and a y of another dtype are copied to what the kernel
    takes (contiguous rows of x's dtype), not refused."""
    gen = torch.Generator().manual_seed(8)
    xs = [torch.randn(5, 3, generator=gen).T, torch.randn(3, 7, 2, generator=gen).transpose(1, 2)]
    ys = [torch.randn(5, 3, generator=gen, dtype=torch.float64).T, torch.randn(3, 7, 2, generator=gen).transpose(1, 2)]
    sketch.set_sketch_backend("triton")
    got = sketch.row_dots(xs, ys)
    want = torch.stack([(x.double() * y.float().double()).flatten(1).sum(1) for x, y in zip(xs, ys)], dim=1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sketch.row_dots(xs), torch.stack([x.double().square().flatten(1).sum(1) for x in xs],
                                                                 dim=1), rtol=1e-5, atol=1e-5)


def test_layer_products_without_a_probe_buffer_use_the_kernel_probes_of_the_seeds():
    """``apply(None)`` on the kernel path: layer l's probe is ``kernel_probe(seeds[l], ...)`` in its
    first ``p_used[l]`` columns, 0 in the others."""
    pairs = _pairs(torch.Generator().manual_seed(9))
    seeds, p_used, p = [11, 12], [3, 2], 3
    sketch.set_sketch_backend("triton")
    prod = sketch.LayerProducts(pairs, [4, 2], [3, 7], p=p, seeds=seeds, p_used=p_used)
    for adjoint in (False, True):
        side = "out" if adjoint else "in"
        probes = torch.zeros(prod.numel(not adjoint))
        for l, block in enumerate(prod.blocks(probes, side)):
            block[:, :p_used[l]] = sketch.kernel_probe(seeds[l], block.shape[0], p_used[l], "cpu")
        want = prod.blocks(prod.apply(probes, adjoint), "in" if adjoint else "out")
        got = prod.blocks(prod.apply(None, adjoint), "in" if adjoint else "out")
        for l, ps in enumerate(pairs):
            g = sum(dy.double().T @ x.double() for x, dy in ps)
            torch.testing.assert_close(got[l].double(), (g.T if adjoint else g) @ prod.blocks(probes, side)[l].double(),
                                       rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got[l], want[l], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("path", ["torch", "triton"])
def test_layer_products_of_explicit_probes_use_only_the_p_used_columns_on_both_paths(path):
    """The kernels read only layer l's first ``p_used[l]`` probe columns and leave the others of
    its output 0; the PyTorch loop multiplied every column, so the two paths differed for a
    probe buffer whose unused columns are not 0."""
    gen = torch.Generator().manual_seed(12)
    pairs = _pairs(gen)
    sketch.set_sketch_backend(path)
    p, p_used = 4, [3, 1]
    prod = sketch.LayerProducts(pairs, [4, 2], [3, 7], p=p, p_used=p_used)
    assert prod.kernels == (path == "triton")
    for adjoint in (False, True):
        v = torch.randn(prod.numel(not adjoint), generator=gen)          # every column random
        got = prod.blocks(prod.apply(v, adjoint), "in" if adjoint else "out")
        src = prod.blocks(v, "out" if adjoint else "in")
        for l, ps in enumerate(pairs):
            g = sum(dy.double().T @ x.double() for x, dy in ps)
            want = torch.zeros(got[l].shape, dtype=torch.float64)
            want[:, :p_used[l]] = (g.T if adjoint else g) @ src[l][:, :p_used[l]].double()
            torch.testing.assert_close(got[l].double(), want, rtol=1e-5, atol=1e-5)


def test_layer_products_refuse_p_used_outside_zero_to_p():
    pairs = _pairs(torch.Generator().manual_seed(13))
    for p_used in ([3, 4], [-1, 1], [1]):
        with pytest.raises(ValueError, match=r"^lorambo.ops.sketch.LayerProducts: p_used .* must give one count"):
            sketch.LayerProducts(pairs, [4, 2], [3, 7], p=3, p_used=p_used)
