"""What lorambo_kernels.config picks for a launch, from shapes, dtype and device alone (the launch
constants themselves wait for GPU measurements; here the choices between them)."""

import pytest
import torch

from lorambo_kernels import config

H100 = (132, (9, 0))
HALF = (torch.bfloat16, torch.float16)


@pytest.fixture
def tf32_switch():
    """Sets torch.backends.cuda.matmul.allow_tf32 (not monkeypatch-able: a property of torch's module
    object), restored afterwards."""
    matmul = torch.backends.cuda.matmul
    before = matmul.allow_tf32

    def switch(value):
        matmul.allow_tf32 = value

    yield switch
    matmul.allow_tf32 = before


def test_input_precision_follows_the_device_and_torchs_tf32_switch(monkeypatch, tf32_switch):
    """Half precision runs on tensor cores; fp32 is IEEE unless torch's TF32 switch is on; the
    interpreter multiplies bf16 tiles widened to fp32 ("upcast")."""
    with config.plan_for_gpu(*H100):
        for allow_tf32 in (False, True):
            tf32_switch(allow_tf32)
            assert [config.input_precision(d) for d in (*HALF, torch.float32)] == [
                "ieee", "ieee", "tf32" if allow_tf32 else "ieee"]
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    tf32_switch(True)
    assert [config.input_precision(d) for d in (*HALF, torch.float32)] == ["upcast", "ieee", "ieee"]
