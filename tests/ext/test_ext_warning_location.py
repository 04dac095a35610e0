"""The one warning of a broken extension is reported at the user's line (the forward that
loaded it), not at the line inside lorambo that asked for it (ops/backend.py)."""

import inspect
import types
import warnings

import pytest
import torch
from torch import nn

import lorambo
from lorambo.ext import loader as ext_loader
from lorambo.ops import backend


@pytest.fixture
def broken_extension(monkeypatch):
    """A loader that has not tried yet and whose import of lorambo._C fails (built or not)."""
    def fails(name):
        raise ImportError(f"{name}: broken for this test")

    saved = dict(ext_loader._state)
    ext_loader._state.clear()
    monkeypatch.setattr(ext_loader, "importlib", types.SimpleNamespace(import_module=fails))
    backend.set_backend("auto")  # auto loads the extension for a CPU float32 forward
    yield
    backend.set_backend(None)
    ext_loader._state.clear()
    ext_loader._state.update(saved)


def test_broken_extension_warning_points_at_the_forward_that_loaded_it(broken_extension):
    torch.manual_seed(0)
    model = lorambo.configure_model(nn.Sequential(nn.Linear(4, 3)), 1)
    x = torch.randn(2, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(x)
        line = inspect.currentframe().f_lineno - 1  # the forward's line
    messages = [(w.filename, w.lineno) for w in caught if "lorambo._C failed to import" in str(w.message)]
    assert messages == [(__file__, line)]
