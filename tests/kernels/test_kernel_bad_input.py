"""Bad input to the Triton op raises a clear error before any kernel is launched."""

import pytest
import torch
from lora_oracle import make_inputs

from lorambo.ops.triton_linear import lora_linear_triton


@pytest.fixture
def no_launch(monkeypatch):
    """Fail the test if any kernel-launching function is reached."""
    import lorambo_kernels.lora_linear as kernels

    def boom(*args, **kwargs):
        raise AssertionError("a kernel was launched for bad input")

    monkeypatch.setattr(kernels, "lora_linear_forward", boom)


def call(**over):
    inputs = make_inputs(4, 8, 6, 4)
    args = dict(inputs, rank=2, scaling=1.0)
    args.update(over)
    return lora_linear_triton(**args)


@pytest.mark.parametrize("over,exc,match", [
    (dict(x=torch.randn(4, 7)), ValueError, "last dim 7"),
    (dict(weight=torch.randn(6, 9)), ValueError, "last dim 8"),
    (dict(lora_A=torch.randn(4, 9)), ValueError, r"lora_A is \(4, 9\)"),
    (dict(lora_B=torch.randn(6, 5)), ValueError, r"lora_B is \(6, 5\)"),
    (dict(bias=torch.randn(5)), ValueError, r"bias is \(5,\)"),
    (dict(weight=torch.randn(6)), ValueError, "must be 2-D"),
    (dict(rank=5), ValueError, "rank 5 outside"),
    (dict(rank=-1), ValueError, "rank -1 outside"),
    (dict(rank=2.0), TypeError, "rank must be an int"),
    (dict(rank=True), TypeError, "rank must be an int"),
    (dict(scaling=torch.tensor(1.0)), TypeError, "scaling"),
    (dict(scaling=float("nan")), ValueError, "scaling must be finite, got nan"),
    (dict(dropout_p=1.0, seed=1), ValueError, "dropout_p"),
    (dict(dropout_p=0.1, seed=None), ValueError, "seed"),
    (dict(dropout_p=0.1, seed=-3), ValueError, "seed"),
    (dict(x=torch.randn(4, 8, dtype=torch.float16)), TypeError, "one dtype"),
    (dict(x=torch.randn(4, 8, dtype=torch.float64), weight=torch.randn(6, 8, dtype=torch.float64),
          lora_A=torch.randn(4, 8, dtype=torch.float64), lora_B=torch.randn(6, 4, dtype=torch.float64),
          bias=None), TypeError, "float64 is not supported"),
    (dict(x=[[1.0] * 8]), TypeError, "x must be a torch.Tensor"),
    (dict(x=torch.randn(4, 8, device="meta")), ValueError, "one device"),
])
def test_bad_input_raises_before_launch(over, exc, match, no_launch):
    with pytest.raises(exc, match=match):
        call(**over)


def test_device_without_triton_support_raises(no_launch):
    # meta tensors everywhere: consistent, but neither CUDA nor interpreter CPU
    meta = {n: (t.detach().to("meta") if t is not None else None) for n, t in make_inputs(4, 8, 6, 4).items()}
    with pytest.raises(RuntimeError, match="CUDA device"):
        lora_linear_triton(**meta, rank=2, scaling=1.0)
