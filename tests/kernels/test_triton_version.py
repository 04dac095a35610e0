"""A triton older than the ``triton`` extra allows is refused by name, before any kernel launches."""

import re

import pytest
import torch
import triton

import lorambo
from lorambo_kernels import config
from pyproject_data import pyproject


def test_the_triton_extra_states_the_oldest_triton_the_kernels_accept():
    extra = pyproject()["project"]["optional-dependencies"]["triton"]
    assert extra == ["triton>=" + ".".join(map(str, config.MIN_TRITON))]


@pytest.mark.parametrize("device_type", ["cuda", "cpu"])
def test_an_older_triton_is_named_with_the_version_needed(monkeypatch, device_type):
    # before: triton 3.0 passed the check; with TRITON_INTERPRET=true it then compiled for CPU
    # tensors and failed inside triton with "0 active drivers ([]). There should only be one."
    monkeypatch.setattr(triton, "__version__", "3.0.0")
    monkeypatch.setenv("TRITON_INTERPRET", "true")
    assert config.unavailable_reason(device_type) == (
        "triton 3.0.0 is older than 3.6, the oldest lorambo's kernels support (pip install 'triton>=3.6')")


def test_the_triton_backend_refuses_an_older_triton_before_running(monkeypatch):
    monkeypatch.setattr(triton, "__version__", "3.5.1")
    layer = lorambo.LoRAMBoLinear(torch.nn.Linear(8, 6), rank=2, capacity=4)
    previous = lorambo.get_backend()
    lorambo.set_backend("triton")
    try:
        with pytest.raises(RuntimeError, match=re.escape("triton 3.5.1 is older than 3.6")):
            layer(torch.randn(3, 8))
    finally:
        lorambo.set_backend(previous)


def test_the_installed_triton_is_accepted():
    assert config._version(triton.__version__) >= config.MIN_TRITON
    assert config.unavailable_reason("cuda") is None
