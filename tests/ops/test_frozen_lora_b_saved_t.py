"""A layer whose lora_B is frozen keeps no t = drop(x) A_r^T [M, r] for its backward.

Only dB_r = s dY^T t reads t (dx reads W, A_r, B_r and grad_y; dA_r reads x and grad_y B_r), so
with lora_B frozen the backward keeps a one-element stand-in of t (lorambo.ops.custom_op.
t_for_backward). Checked by the bytes autograd saves, eagerly (the torch and Triton backends'
autograd Functions, the extension's C++ autograd), through the custom ops and
under torch.compile; gradients and exact Hessian-vector products (create_graph=True) w.r.t.
x and lora_A still equal a float64 plain-torch reference.
"""

import pytest
import torch

from cpu_backends import BACKENDS, op_for
from saved_bytes import layer_operands, op_runner, saved_bytes

M, K, N, CAPACITY, RANK, SCALING = 64, 8, 6, 5, 4, 1.5


def _layer(seed, train_a, train_b, in_features=K):
    return layer_operands(seed, N, in_features, CAPACITY, train_a, train_b)


def _runner(backend, path, p=0.0, seed=7):
    return op_runner(op_for(backend), path, RANK, SCALING, p, seed)


def _saved(backend, path, train_a, train_b, dropout):
    params = _layer(1, train_a, train_b)
    x = torch.randn(M, K, requires_grad=True)
    run, context = _runner(backend, path, dropout)
    return saved_bytes(lambda: run(x, *params), params, context)


T_BYTES, X_BYTES = M * RANK * 4, M * K * 4


@pytest.mark.parametrize("backend, path", [(b, "eager") for b in BACKENDS]
                         + [(b, p) for b in BACKENDS for p in ("custom_op", "compiled")])
@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_a_frozen_lora_b_keeps_no_t(backend, path, dropout):
    # all frozen but x: a stand-in of x and of t, and 0-d tensors (the seed)
    assert _saved(backend, path, False, False, dropout) <= 64
    # lora_A trains: x (dA_r reads it), not t
    assert X_BYTES <= _saved(backend, path, True, False, dropout) <= X_BYTES + 64
    # lora_B trains: t (dB_r reads it); LoRA-FA keeps no x
    assert T_BYTES <= _saved(backend, path, False, True, dropout) <= T_BYTES + 64


def _reference(x, weight, bias, lora_A, lora_B):
    d = lambda t: t.double()  # noqa: E731
    return x @ d(weight).t() + d(bias) + SCALING * (x @ lora_A[:RANK].t()) @ d(lora_B)[:, :RANK].t()


def _assert_close(actual, expected):
    torch.testing.assert_close(actual.double(), expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("path", ["eager", "custom_op"])  # AOTAutograd compiles no double backward
def test_gradients_and_hessian_vector_products_with_a_frozen_lora_b_match_float64(backend, path):
    # two layers with trainable lora_A and frozen lora_B: d/d(A1, A2, x) of <dL/d(A1, A2), v>
    first, second = _layer(3, True, False), _layer(4, True, False, in_features=N)
    x = torch.randn(M, K, requires_grad=True)
    gen = torch.Generator().manual_seed(5)
    vs = [torch.randn(CAPACITY, k, generator=gen) for k in (K, N)]
    run, context = _runner(backend, path)
    with context():
        loss = run(run(x, *first).tanh(), *second).square().sum()
        grads = torch.autograd.grad(loss, (first[2], second[2]), create_graph=True)
        hvp = torch.autograd.grad(sum((g * v).sum() for g, v in zip(grads, vs)), (first[2], second[2], x))
    x64 = x.detach().double().requires_grad_()
    a1, a2 = (p[2].detach().double().requires_grad_() for p in (first, second))
    loss64 = _reference(_reference(x64, *first[:2], a1, first[3]).tanh(), *second[:2], a2, second[3]).square().sum()
    grads64 = torch.autograd.grad(loss64, (a1, a2), create_graph=True)
    hvp64 = torch.autograd.grad(sum((g * v.double()).sum() for g, v in zip(grads64, vs)), (a1, a2, x64))
    for got, want in zip((*grads, *hvp), (*grads64, *hvp64)):
        _assert_close(got.detach(), want.detach())
