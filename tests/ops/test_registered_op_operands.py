"""The backends' registered LoRA ops, called directly through ``torch.ops`` (past the public
functions' checks), refuse bad operands with the public functions' errors, naming the op and the
value. The Python custom ops (``lorambo_ref``, ``lorambo_triton``) checked nothing: the reference
computed with a rank outside the pool, a lora_B wider than lora_A, a [1, N] bias or dropout_p = 1
(inf outputs) and gave raw matmul errors for other shapes; the Triton ops would launch kernels on
them. The extension's C++ ops (``lorambo::``, called by ``lorambo_ext``) checked all but the
scaling, and returned nan for a nan or inf one."""

import math

import pytest
import torch

import lorambo.ops.lora_linear_ref  # noqa: F401  registers torch.ops.lorambo_ref
import lorambo.ops.triton_linear  # noqa: F401  registers torch.ops.lorambo_triton (needs no triton)
from lorambo.ext import loader as ext_loader

M, K, N, CAP, RANK = 4, 6, 5, 3, 2
# the Python custom ops check every operand before their kernels run (the Triton ones: on CPU too)
PYTHON_OPS = ["lorambo_ref", "lorambo_triton"]


def operands(dtype=torch.float32, **swap):
    gen = torch.Generator().manual_seed(0)
    shapes = dict(x=(M, K), weight=(N, K), bias=(N,), lora_A=(CAP, K), lora_B=(N, CAP), grad_y=(M, N),
                  t=(M, RANK))
    shapes.update(swap)
    return {name: torch.randn(s, generator=gen, dtype=dtype) for name, s in shapes.items()}


def call_fwd(ops, o, rank=RANK, scaling=0.5, p=0.0, seed=3):
    return ops.lora_linear_fwd(o["x"], o["weight"], o["bias"], o["lora_A"], o["lora_B"], rank, scaling, p,
                               torch.tensor(seed))


def call_bwd(ops, o, rank=RANK, scaling=0.5, p=0.0, seed=3):
    return ops.lora_linear_bwd(o["grad_y"], o["x"], o["weight"], o["lora_A"], o["lora_B"], o["t"], rank, scaling,
                               p, torch.tensor(seed), True, True, True, True, True)


BAD_OPERANDS = [
    (dict(x=(M, K + 1)), {}, ValueError, r"x has last dim 7 \(shape \(4, 7\)\)"),
    (dict(x=(2, M, K)), {}, ValueError, r"x must be 2-D \[M, K\], got shape \(2, 4, 6\)"),
    (dict(lora_A=(CAP, K + 1)), {}, ValueError, r"lora_A is \(3, 7\), expected \[capacity, 6\]"),
    (dict(lora_B=(N, CAP + 1)), {}, ValueError, r"lora_B is \(5, 4\), expected \[5, 3\]"),
    ({}, dict(rank=CAP + 1), ValueError, r"rank 4 outside \[0, capacity = 3\]"),
    ({}, dict(rank=-1), ValueError, r"rank -1 outside \[0, capacity = 3\]"),
    ({}, dict(scaling=math.nan), ValueError, r"scaling must be finite, got nan"),
    ({}, dict(scaling=-math.inf), ValueError, r"scaling must be finite, got -inf"),
    ({}, dict(p=1.0), ValueError, r"dropout_p 1.0 must be in \[0, 1\)"),
    ({}, dict(p=-0.25), ValueError, r"dropout_p -0.25 must be in \[0, 1\)"),
    ({}, dict(p=0.5, seed=-2), ValueError, r"seed must be an int in \[0, 2\*\*63\), got -2"),
]


@pytest.mark.parametrize("ns", PYTHON_OPS)
@pytest.mark.parametrize("swap, scalars, error, match", BAD_OPERANDS)
def test_forward_and_backward_ops_refuse_what_the_public_ops_refuse(ns, swap, scalars, error, match):
    ops = getattr(torch.ops, ns)
    with pytest.raises(error, match=rf"^{ns}::lora_linear_fwd: {match}"):
        call_fwd(ops, operands(**swap), **scalars)
    with pytest.raises(error, match=rf"^{ns}::lora_linear_bwd: {match}"):
        call_bwd(ops, operands(**swap), **scalars)


@pytest.mark.parametrize("ns", PYTHON_OPS)
def test_forward_op_refuses_a_bias_that_would_broadcast_and_mixed_dtypes(ns):
    ops = getattr(torch.ops, ns)
    with pytest.raises(ValueError, match=rf"^{ns}::lora_linear_fwd: bias is \(1, 5\), expected \[5\]"):
        call_fwd(ops, operands(bias=(1, N)))
    o = operands()
    o["weight"] = o["weight"].double()
    with pytest.raises(TypeError, match=rf"^{ns}::lora_linear_fwd: all tensors must share one dtype, got .*"
                                        r"'weight': torch.float64"):
        call_fwd(ops, o)
    with pytest.raises(TypeError, match=rf"^{ns}::lora_linear_bwd: all tensors must share one dtype"):
        call_bwd(ops, o)


@pytest.mark.parametrize("ns", PYTHON_OPS)
@pytest.mark.parametrize("name, shape", [("grad_y", (M, N + 1)), ("t", (M, RANK + 1))])
def test_backward_op_refuses_grad_y_and_t_of_other_shapes(ns, name, shape):
    with pytest.raises(ValueError, match=rf"^{ns}::lora_linear_bwd: {name} is \({shape[0]}, {shape[1]}\), "
                                         rf"expected \[{M}, {shape[1] - 1}\]"):
        call_bwd(getattr(torch.ops, ns), operands(**{name: shape}))


@pytest.mark.parametrize("ns", PYTHON_OPS)
@pytest.mark.parametrize("name", ["grad_y", "t"])
def test_backward_op_refuses_grad_y_and_t_of_another_dtype(ns, name):
    o = operands()
    o[name] = o[name].double()
    with pytest.raises(TypeError, match=rf"^{ns}::lora_linear_bwd: {name} is torch.float64 on cpu, x is "
                                        r"torch.float32 on cpu"):
        call_bwd(getattr(torch.ops, ns), o)


@pytest.mark.parametrize("ns", PYTHON_OPS)
def test_dropout_multiplier_op_refuses_p_outside_its_range_and_a_negative_seed(ns):
    ops = getattr(torch.ops, ns)
    x = operands()["x"]
    with pytest.raises(ValueError, match=rf"^{ns}::dropout_multiplier: dropout_p 1.0 must be in \[0, 1\)"):
        ops.dropout_multiplier(x, 1.0, torch.tensor(3))
    with pytest.raises(ValueError, match=rf"^{ns}::dropout_multiplier: seed must be an int in \[0, 2\*\*63\)"):
        ops.dropout_multiplier(x, 0.5, torch.tensor(-1))


def test_dtype_outside_the_backend_is_refused_naming_the_op():
    ints = {name: t.to(torch.int64) for name, t in operands().items()}
    with pytest.raises(TypeError, match=r"^lorambo_ref::lora_linear_fwd: x has dtype torch.int64; the op "
                                        r"computes in a real floating dtype"):
        call_fwd(torch.ops.lorambo_ref, ints)
    with pytest.raises(TypeError, match=r"^lorambo_triton::lora_linear_fwd: dtype torch.float64 is not supported "
                                        r"by the Triton kernels"):
        call_fwd(torch.ops.lorambo_triton, operands(dtype=torch.float64))


def test_triton_op_on_cpu_tensors_says_the_kernels_cannot_run_there(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match=r"^lorambo_triton::lora_linear_fwd: .*(CUDA device|triton)"):
        call_fwd(torch.ops.lorambo_triton, operands())


def test_reference_ops_compute_on_good_operands_as_the_public_op():
    """The checks refuse nothing the public op takes: same outputs, rank 0 and dropout included."""
    from lorambo.ops.lora_linear_ref import lora_linear_reference

    o = operands(dtype=torch.float64)
    for rank, p in ((0, 0.0), (CAP, 0.0), (RANK, 0.3)):
        y, t = call_fwd(torch.ops.lorambo_ref, o, rank=rank, p=p, seed=11)
        want = lora_linear_reference(o["x"], o["weight"], o["bias"], o["lora_A"], o["lora_B"], rank, 0.5, p, 11)
        torch.testing.assert_close(y, want, rtol=0, atol=0)
        assert t.shape == (M, rank)
        grads = call_bwd(torch.ops.lorambo_ref, dict(o, t=t), rank=rank, p=p, seed=11)
        assert [tuple(g.shape) for g in grads] == [(M, K), (N, K), (N,), (CAP, K), (N, CAP)]


@pytest.mark.skipif(ext_loader.load() is None, reason="compiled extension not built")
@pytest.mark.parametrize("scaling", [math.nan, math.inf])
def test_extension_ops_refuse_a_scaling_that_is_not_finite(scaling):
    """The C++ ops, directly and through lorambo_ext's custom ops, which call them."""
    o = operands()
    args = (o["x"], o["weight"], o["bias"], o["lora_A"], o["lora_B"], RANK, scaling)
    for op in (torch.ops.lorambo.lora_linear, torch.ops.lorambo.lora_linear_fwd):  # the first calls the second
        with pytest.raises(RuntimeError, match=rf"^lorambo::lora_linear_fwd: scaling must be finite, got {scaling}"):
            op(*args, 0.0, 0)
    with pytest.raises(RuntimeError, match=rf"lorambo::lora_linear_fwd: scaling must be finite, got {scaling}"):
        call_fwd(torch.ops.lorambo_ext, o, scaling=scaling)
    with pytest.raises(RuntimeError, match=rf"lorambo::lora_linear_bwd: scaling must be finite, got {scaling}"):
        torch.ops.lorambo.lora_linear_bwd(o["grad_y"], o["x"], o["weight"], o["lora_A"], o["lora_B"], o["t"], RANK,
                                          scaling, 0.0, 0, [True] * 5)
