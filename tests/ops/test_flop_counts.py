"""FlopCounterMode sees the LoRA op's real work on every backend that runs on CPU.

The expected count is FlopCounterMode over the same math written as plain torch products
(x W^T + b + s * (drop(x) A_r^T) B_r^T, autograd's own backward), never the lorambo formulas.
"""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import lorambo
from lorambo.ext import loader as ext_loader
from lorambo.nn.lora_linear import LoRAMBoLinear

from cpu_backends import BACKENDS


def _count(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _plain_math(x, weight, bias, lora_A, lora_B, rank, scaling, mask):
    x2 = x.reshape(-1, x.shape[-1])
    y = torch.mm(x2, weight.t()) + bias
    if rank > 0:
        y = y + scaling * torch.mm(torch.mm(x2 * mask, lora_A[:rank].t()), lora_B[:, :rank].t())
    return y


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rank, x_grad, w_grad, dropout", [
    (3, True, False, 0.0),   # the usual fine-tuning layer
    (3, False, False, 0.0),  # first layer: no gradient for the input
    (8, True, True, 0.0),    # full capacity, trainable base weight
    (0, True, False, 0.0),   # rank 0: the base product alone
    (5, True, False, 0.25),  # dropout: elementwise, no extra products
])
def test_forward_backward_flops_match_plain_torch(backend, rank, x_grad, w_grad, dropout):
    lorambo.set_backend(backend)
    layer = LoRAMBoLinear(torch.nn.Linear(12, 10), rank=rank, capacity=8, dropout=dropout)
    layer.base_layer.weight.requires_grad_(w_grad)
    with torch.no_grad():
        layer.lora_B.normal_()  # B starts at zero; values do not change the count but keep it honest
    x = torch.randn(2, 3, 12, requires_grad=x_grad)
    lora_flops = _count(lambda: layer(x).sum().backward())

    weight = layer.base_layer.weight.detach().clone().requires_grad_(w_grad)
    bias = layer.base_layer.bias.detach().clone()
    lora_A = layer.lora_A.detach().clone().requires_grad_(True)
    lora_B = layer.lora_B.detach().clone().requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(x_grad)
    mask = torch.ones(6, 12)
    plain = _count(lambda: _plain_math(x_ref, weight, bias, lora_A, lora_B, rank, 2.0, mask).sum().backward())

    m, k, n = 6, 12, 10
    assert plain >= 2 * m * k * n  # the plain math was counted (at least its base product)
    assert lora_flops == plain


@pytest.mark.parametrize("backend", BACKENDS)
def test_inference_flops_use_the_active_rank(backend):
    lorambo.set_backend(backend)
    layer = LoRAMBoLinear(torch.nn.Linear(16, 12), rank=2, capacity=12)
    x = torch.randn(7, 16)
    with torch.inference_mode():
        flops = _count(lambda: layer(x))
    assert flops == 2 * 7 * 16 * 12 + 2 * 7 * 16 * 2 + 2 * 7 * 2 * 12


@pytest.mark.skipif(ext_loader.load() is None, reason="extension not built")
@pytest.mark.parametrize("mode", ["grad", "no_grad", "inference"])
def test_extension_op_called_directly(mode):
    """torch.ops.lorambo.lora_linear (C++ autograd) reaches the mode as lora_linear_fwd/_bwd, or
    whole in inference mode."""
    m, k, n, cap, r = 5, 9, 6, 4, 3
    x = torch.randn(m, k, requires_grad=mode == "grad")
    weight, bias = torch.randn(n, k), torch.randn(n)
    lora_A = torch.randn(cap, k, requires_grad=mode == "grad")
    lora_B = torch.randn(n, cap, requires_grad=mode == "grad")

    def run():
        y = torch.ops.lorambo.lora_linear(x, weight, bias, lora_A, lora_B, r, 0.5, 0.0, 0)
        if mode == "grad":
            y.sum().backward()

    context = {"grad": torch.enable_grad, "no_grad": torch.no_grad, "inference": torch.inference_mode}[mode]
    with context():
        flops = _count(run)
    forward = 2 * m * k * n + 2 * m * k * r + 2 * m * r * n
    backward = 2 * m * n * r + (2 * m * n * k + 2 * m * r * k) + 2 * m * r * k + 2 * m * n * r
    assert flops == forward + (backward if mode == "grad" else 0)
