"""Backend selection: environment variable, set_backend, and no silent fallback."""

import pytest
import torch

import lorambo
from lorambo.ops.backend import get_backend, resolve_backend


def _adapted_layer(in_features, out_features, rank, capacity, dtype=torch.float32):
    """A layer with a nonzero B, so the adapter path shows in its output and gradients."""
    layer = lorambo.LoRAMBoLinear(torch.nn.Linear(in_features, out_features, dtype=dtype), rank=rank,
                                  capacity=capacity)
    with torch.no_grad():
        layer.lora_B.normal_()
    return layer


def _float64_reference(layer, x):
    """``x W^T + b + s (x A_r^T) B_r^T`` in float64 plain torch, differentiable in x, A and B."""
    r = layer.rank
    a, b = layer.lora_A.detach().double().requires_grad_(), layer.lora_B.detach().double().requires_grad_()
    x = x.detach().double().requires_grad_()
    y = x @ layer.weight.detach().double().T + layer.bias.detach().double() + layer.scaling * (x @ a[:r].T) @ b[:, :r].T
    return y, (x, a, b)


def test_env_var_is_read_once_and_set_backend_none_rereads_it(monkeypatch):
    monkeypatch.setenv("LORAMBO_BACKEND", "torch")
    lorambo.set_backend(None)
    assert get_backend() == "torch"
    monkeypatch.setenv("LORAMBO_BACKEND", "ext")
    assert get_backend() == "torch"  # cached: no environment read per call
    lorambo.set_backend("auto")
    assert get_backend() == "auto"
    lorambo.set_backend(None)
    assert get_backend() == "ext"


def test_an_empty_env_var_means_unset(monkeypatch):
    lorambo.set_backend("torch")
    monkeypatch.setenv("LORAMBO_BACKEND", "")
    lorambo.set_backend(None)
    assert get_backend() == "auto"
    monkeypatch.setenv("LORAMBO_BACKEND", "  ")  # whitespace only is a name, and no backend's
    with pytest.raises(ValueError, match=r"'  '.*\$LORAMBO_BACKEND"):
        lorambo.set_backend(None)


def test_unknown_backend_is_rejected(monkeypatch):
    with pytest.raises(ValueError, match="'cuda'.*lorambo.set_backend"):
        lorambo.set_backend("cuda")
    monkeypatch.setenv("LORAMBO_BACKEND", "fast")
    with pytest.raises(ValueError, match=r"'fast'.*\$LORAMBO_BACKEND"):
        lorambo.set_backend(None)


@pytest.mark.parametrize("name", [5, torch.float32, b"torch"])
def test_a_backend_name_that_is_not_a_string_is_a_type_error(name):
    # before: AttributeError ("'int' object has no attribute 'strip'") from inside lorambo
    try:
        with pytest.raises(TypeError, match=r"lorambo\.set_backend.*a string"):
            lorambo.set_backend(name)
        assert get_backend() in ("auto", "torch", "triton", "ext")  # the request was not changed
    finally:
        lorambo.set_backend(None)


def test_forward_reads_no_environment_and_imports_nothing(monkeypatch):
    """After the first call the backend is cached: a forward neither reads $LORAMBO_BACKEND nor
    loads the extension (both are what broke torch.compile's trace)."""
    import importlib

    from lorambo.ext import loader as ext_loader

    layer = lorambo.LoRAMBoLinear(torch.nn.Linear(6, 4), rank=2)
    x = torch.randn(3, 6)
    first = layer(x)
    monkeypatch.setenv("LORAMBO_BACKEND", "no-such-backend")

    def forbidden(*args, **kwargs):
        raise AssertionError("the forward path must not import or load anything")

    monkeypatch.setattr(ext_loader, "load", forbidden)
    monkeypatch.setattr(importlib, "import_module", forbidden)
    assert torch.equal(layer(x), first)


def test_set_backend_switches_at_the_next_call():
    """The resolution cache is dropped by set_backend: the very next call runs the new backend
    (told apart by the dropout mask, which differs between the reference and the extension)."""
    from lorambo.ext import loader as ext_loader
    from lorambo.ops import lora_linear
    from lorambo.ops.ext_linear import lora_linear_ext
    from lorambo.ops.lora_linear_ref import lora_linear_reference

    x, w, b = torch.randn(4, 6), torch.randn(5, 6), torch.randn(5)
    a, bb = torch.randn(3, 6), torch.randn(5, 3)
    args = (x, w, b, a, bb, 3, 1.5, 0.5, 11)
    lorambo.set_backend("torch")
    assert torch.equal(lora_linear(*args), lora_linear_reference(*args))
    if ext_loader.load() is not None:
        lorambo.set_backend("ext")
        got = lora_linear(*args)
        assert torch.equal(got, lora_linear_ext(*args)) and not torch.allclose(got, lora_linear_reference(*args))
    lorambo.set_backend("triton")  # cannot run on 'meta': the next resolution says so
    with pytest.raises(RuntimeError, match="'triton' was requested"):
        resolve_backend("meta", torch.float32)


def test_auto_picks_the_compiled_op_on_cpu_when_built_else_the_reference():
    from lorambo.ext import ops as ext_ops

    built = ext_ops.available()
    for dtype in (None, torch.float32, torch.float64, torch.bfloat16):
        assert resolve_backend("cpu", dtype) == ("ext" if built else "torch")
    assert resolve_backend("cpu", torch.float16) == "torch"  # the compiled CPU op has no fp16
    assert resolve_backend("cuda", torch.float32) == "torch"  # Triton: not yet verified on a GPU


def test_auto_layer_without_extension_runs_the_reference(monkeypatch):
    from lorambo.ext import loader as ext_loader

    layer = _adapted_layer(6, 4, rank=2, capacity=3)
    x = torch.randn(3, 6)
    monkeypatch.setattr(ext_loader, "load", lambda: None)
    lorambo.set_backend("auto")  # resolution is cached: re-resolve without the extension
    assert resolve_backend("cpu", torch.float32) == "torch"
    want, _ = _float64_reference(layer, x)
    torch.testing.assert_close(layer(x).double(), want, rtol=1e-5, atol=1e-5)


def test_explicit_triton_never_falls_back():
    lorambo.set_backend("triton")
    with pytest.raises(RuntimeError, match="'triton' was requested.*CUDA device.*'meta'"):
        resolve_backend("meta")


def test_triton_backend_runs_the_kernels_under_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    layer = _adapted_layer(16, 8, rank=3, capacity=4)
    x = torch.randn(5, 16)
    want, _ = _float64_reference(layer, x)
    lorambo.set_backend("triton")
    torch.testing.assert_close(layer(x).double(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("triton_version, numpy_version, runs", [
    ("3.6.0", "2.4.6", False), ("3.6.0", "2.5.0rc1", False), ("3.6.0", "2.3.5", True),
    ("3.7.0", "2.4.6", True), ("3.9.0", "2.5.0", True), ("4.0.0", "3.0.0", True)])
def test_an_interpreter_that_cannot_run_the_kernels_is_named(monkeypatch, triton_version, numpy_version, runs):
    # triton 3.6's interpreter turns loaded scalars into ints in a way numpy >= 2.4 rejects.
    numpy, triton = pytest.importorskip("numpy"), pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(triton, "__version__", triton_version)
    monkeypatch.setattr(numpy, "__version__", numpy_version)
    lorambo.set_backend("triton")
    if runs:
        assert resolve_backend("cpu", torch.float32) == "triton"
        return
    with pytest.raises(RuntimeError, match=f"'triton' was requested.*triton {triton_version}'s interpreter.*"
                                           f"numpy {numpy_version}.*triton >= 3.7 or numpy < 2.4"):
        resolve_backend("cpu", torch.float32)


def test_ext_backend_matches_the_reference_through_a_layer():
    from lorambo.ext import loader as ext_loader

    if ext_loader.load() is None:
        pytest.skip("compiled extension not built (CI builds it and sets LORAMBO_REQUIRE_EXT=1)")
    layer = _adapted_layer(16, 8, rank=3, capacity=4, dtype=torch.float64)
    x = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    want, leaves = _float64_reference(layer, x)
    grads_want = torch.autograd.grad(want.square().sum(), leaves)
    lorambo.set_backend("ext")
    got = layer(x)
    grads_got = torch.autograd.grad(got.square().sum(), (x, layer.lora_A, layer.lora_B))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for g, e in zip(grads_got, grads_want):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)
