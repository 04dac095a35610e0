"""Element offsets past 2**31: the kernels address ``row * stride`` in int64.

A row m of an operand sits m * stride elements from its start; with int32 indices that product
wraps around once it reaches 2**31 (an [M, K] input or an [M, N] output of more than 2**31
elements, e.g. 150k tokens through a 14336-wide projection) and the kernels read and write
outside the tensor. Rows 2**30 elements apart reach it with three rows: the storage behind them
is 4 GiB of fp16 (2 GiB of int8 for the mask kernel), of which only the rows used are ever touched
on the CPU; on a GPU they are real allocations, up to about 24 GiB at once.
"""

import pytest
import torch
from lora_oracle import assert_tolerance_rule, double, grads_of, multiplier_for, oracle

from lorambo.ops.triton_linear import lora_linear_triton

ROW_GAP = 2**30  # int32 row * stride overflows at row 2
M, K, N, CAP, RANK = 3, 8, 5, 4, 3


def _rows_far_apart(rows, dtype, device, gen):
    """An [rows, K] view whose rows are ROW_GAP elements apart, filled with seeded values."""
    storage = torch.empty((rows - 1) * ROW_GAP + K, dtype=dtype, device=device)
    x = torch.as_strided(storage, (rows, K), (ROW_GAP, 1))
    with torch.no_grad():
        x.copy_(torch.randn(rows, K, generator=gen, dtype=torch.float64).to(dtype))
    return x


class _FarRowsTorch:
    """``torch`` for the launcher modules, whose ``empty`` gives every [M, n] buffer they allocate
    (y, dX, t, t') rows ROW_GAP elements apart: the kernels' stores and the later loads of t."""

    def __getattr__(self, name):
        return getattr(torch, name)

    def empty(self, size, *, dtype=None, device=None):
        size = tuple(size)
        if len(size) == 2 and size[0] == M and size[1] > 0:
            storage = torch.empty((M - 1) * ROW_GAP + size[1], dtype=dtype, device=device)
            return torch.as_strided(storage, size, (ROW_GAP, 1))
        return torch.empty(size, dtype=dtype, device=device)


@pytest.mark.parametrize("far_outputs", [False, True])
@pytest.mark.parametrize("dropout_p", [0.0, 0.5])  # the fused down-projection, and lora_down + the GEMM
def test_rows_past_two_to_the_31_elements(dropout_p, far_outputs, device, monkeypatch):
    from lorambo_kernels import fused_gemm, lora_skinny

    if far_outputs:
        for module in (fused_gemm, lora_skinny):
            monkeypatch.setattr(module, "torch", _FarRowsTorch())
    gen = torch.Generator().manual_seed(2)
    dtype = torch.float16
    x = _rows_far_apart(M, dtype, device, gen).requires_grad_(True)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)

    inputs = dict(x=x, weight=rnd(N, K), bias=rnd(N).requires_grad_(True), lora_A=rnd(CAP, K).requires_grad_(True),
                  lora_B=rnd(N, CAP).requires_grad_(True))
    names = ["x", "bias", "lora_A", "lora_B"]
    grad_y = rnd(M, N)
    seed = 7 if dropout_p else None
    mask = multiplier_for(7, M, K, dropout_p, device) if dropout_p else None
    y, grads = grads_of(lambda **kw: lora_linear_triton(**kw, rank=RANK, scaling=1.5, dropout_p=dropout_p, seed=seed),
                        inputs, names, grad_y)
    y64, grads64 = grads_of(lambda **kw: oracle(**kw, rank=RANK, scaling=1.5, mask=mask), double(inputs), names,
                            grad_y.double())
    # the same formula in PyTorch's fp16 on contiguous copies: the tolerance rule's yardstick
    near = {n: t.detach().contiguous().requires_grad_(t.requires_grad) for n, t in inputs.items()}
    drop = None if mask is None else mask.to(dtype)
    y16, grads16 = grads_of(lambda **kw: oracle(**kw, rank=RANK, scaling=1.5, mask=drop), near, names, grad_y)
    assert y.stride(0) == (ROW_GAP if far_outputs else N)
    assert_tolerance_rule(y, y16, y64, what="y")
    for name in names:
        assert_tolerance_rule(grads[name], grads16[name], grads64[name], what=f"d{name}")


def test_dropout_mask_kernel_writes_rows_past_two_to_the_31_elements(device):
    from lorambo_kernels.dropout import _keep_mask_kernel

    storage = torch.zeros((M - 1) * ROW_GAP + K, dtype=torch.int8, device=device)
    out = torch.as_strided(storage, (M, K), (ROW_GAP, 1))
    _keep_mask_kernel[(1, 1)](out, M, K, 11, 0.5, out.stride(0), BLOCK_M=32, BLOCK_K=32)
    want = multiplier_for(11, M, K, 0.5, device) > 0
    assert torch.equal(out.bool(), want)


def test_weight_rows_past_two_to_the_31_elements(device):
    # the forward reads W^T: column n of it (row n of W) sits n * stride elements in, as in an
    # output head of more than 2**31 weights
    gen = torch.Generator().manual_seed(3)
    dtype = torch.float16
    weight = _rows_far_apart(3, dtype, device, gen)  # (N = 3, K)
    x, lora_A, lora_B = (torch.randn(*s, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
                         for s in ((M, K), (CAP, K), (3, CAP)))
    y = lora_linear_triton(x, weight, None, lora_A, lora_B, RANK, 0.75)
    near = dict(x=x, weight=weight.contiguous(), bias=None, lora_A=lora_A, lora_B=lora_B)
    y16 = oracle(**near, rank=RANK, scaling=0.75)
    y64 = oracle(**double(near), rank=RANK, scaling=0.75)
    assert_tolerance_rule(y, y16, y64, what="y")
