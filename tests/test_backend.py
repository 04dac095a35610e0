"""Backend selection: environment variable, set_backend, and no silent fallback."""

import pytest
import torch

import lorambo
from lorambo.backend import get_backend, resolve_backend


def test_env_var_and_override(monkeypatch):
    monkeypatch.setenv("LORAMBO_BACKEND", "torch")
    assert get_backend() == "torch"
    lorambo.set_backend("auto")
    assert get_backend() == "auto"
    lorambo.set_backend(None)
    assert get_backend() == "torch"


def test_unknown_backend_is_rejected(monkeypatch):
    with pytest.raises(ValueError, match="'cuda'.*lorambo.set_backend"):
        lorambo.set_backend("cuda")
    monkeypatch.setenv("LORAMBO_BACKEND", "fast")
    with pytest.raises(ValueError, match=r"'fast'.*\$LORAMBO_BACKEND"):
        get_backend()


def test_auto_uses_reference_on_cpu():
    assert resolve_backend("cpu") == "torch"


def test_explicit_triton_never_falls_back():
    lorambo.set_backend("triton")
    with pytest.raises(RuntimeError, match="'triton' was requested.*CUDA device.*'meta'"):
        resolve_backend("meta")


def test_triton_backend_runs_the_kernels_under_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    layer = lorambo.LoRAMBoLinear(torch.nn.Linear(16, 8), rank=3, capacity=4)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(5, 16)
    want = layer(x)
    lorambo.set_backend("triton")
    torch.testing.assert_close(layer(x), want, rtol=1e-4, atol=1e-4)
