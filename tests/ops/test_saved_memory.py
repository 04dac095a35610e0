"""Memory saved for backward follows the active rank, on every backend that runs on CPU.

Counted as the bytes of the distinct storages autograd keeps (``saved_tensors_hooks``), leaving
out the parameters' own storages, which are held anyway. The comparisons are with the frozen
``nn.Linear`` (rank 0) and with a pool whose capacity is the rank (rank r in a larger pool).
"""

import contextlib

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import lorambo
from lorambo.nn.lora_linear import LoRAMBoLinear

from cpu_backends import BACKENDS
from saved_bytes import saved_bytes


# eager: the backends' autograd Functions; custom_op: the torch.library ops, which run under a
# TorchDispatchMode (FlopCounterMode here) and torch.compile
PATHS = {"eager": contextlib.nullcontext, "custom_op": lambda: FlopCounterMode(display=False)}


# 0-d tensors the op may keep: the custom ops' dropout seed, the one-element stand-in of x
_SCALARS = 16


def _saved_bytes(module, x, path="eager") -> int:
    """Bytes of the non-parameter storages the forward saves for backward."""
    return saved_bytes(lambda: module(x), list(module.parameters()), PATHS[path])


def _layer(rank, capacity, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    layer = LoRAMBoLinear(torch.nn.Linear(24, 20), rank=rank, capacity=capacity, dropout=dropout)
    with torch.no_grad():
        layer.lora_B[:, :rank].normal_()
    return layer


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("x_grad", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_rank_zero_saves_what_the_frozen_layer_saves(backend, path, x_grad, dropout):
    # the backward of a rank-0 layer reads only the shape of x: keeping x held an [M, in]
    # activation per rank-0 layer that the frozen layer does not hold
    lorambo.set_backend(backend)
    layer = _layer(0, 8, dropout)
    x = torch.randn(6, 24, requires_grad=x_grad)
    frozen = _saved_bytes(layer.base_layer, x)
    assert _saved_bytes(layer, x, path) <= frozen + _SCALARS


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("rank", [1, 8])
@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_rank_r_in_a_large_pool_saves_what_a_rank_r_pool_saves(backend, path, rank, dropout):
    lorambo.set_backend(backend)
    x = torch.randn(6, 24, requires_grad=True)
    assert _saved_bytes(_layer(rank, 20, dropout), x, path) == _saved_bytes(_layer(rank, rank, dropout), x, path)


def _close(actual, expected):
    """A float32 result against its float64 reference, at float32 tolerances."""
    torch.testing.assert_close(actual.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("w_grad", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_rank_zero_gradients_match_float64_reference(backend, path, w_grad, dropout):
    lorambo.set_backend(backend)
    layer = _layer(0, 8, dropout, seed=11)
    layer.base_layer.weight.requires_grad_(w_grad)
    x = torch.randn(2, 3, 24, requires_grad=True)
    grad_y = torch.randn(2, 3, 20)
    with PATHS[path]():
        y = layer(x)
        y.backward(grad_y)
    w, b = layer.base_layer.weight.detach().double(), layer.base_layer.bias.detach().double()
    x64, g64 = x.detach().double(), grad_y.double()
    _close(y, x64 @ w.t() + b)
    _close(x.grad, g64 @ w)
    if w_grad:
        _close(layer.base_layer.weight.grad, g64.reshape(-1, 20).t() @ x64.reshape(-1, 24))
    assert torch.equal(layer.lora_A.grad, torch.zeros_like(layer.lora_A))
    assert torch.equal(layer.lora_B.grad, torch.zeros_like(layer.lora_B))


@pytest.mark.parametrize("backend", BACKENDS)
def test_rank_zero_double_backward_matches_float64_reference(backend):
    # create_graph=True (Hessian-vector products) runs the differentiable formulas on the saved x
    lorambo.set_backend(backend)
    layer = _layer(0, 8, 0.25, seed=12)
    x = torch.randn(5, 24, requires_grad=True)
    (grad_x,) = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
    (hvp,) = torch.autograd.grad(grad_x.sum(), x)
    w, b = layer.base_layer.weight.detach().double(), layer.base_layer.bias.detach().double()
    x64 = x.detach().double().requires_grad_()
    (ref_grad,) = torch.autograd.grad((x64 @ w.t() + b).square().sum(), x64, create_graph=True)
    (ref_hvp,) = torch.autograd.grad(ref_grad.sum(), x64)
    _close(grad_x, ref_grad.detach())
    _close(hvp, ref_hvp)
