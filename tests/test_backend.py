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


def test_explicit_backends_never_fall_back():
    layer = lorambo.LoRAMBoLinear(torch.nn.Linear(8, 8), rank=2)
    x = torch.randn(3, 8)
    lorambo.set_backend("triton")
    with pytest.raises(NotImplementedError, match="triton"):
        layer(x)
    lorambo.set_backend("ext")
    with pytest.raises(RuntimeError, match="lorambo._C"):
        layer(x)
