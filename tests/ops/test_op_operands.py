"""Every backend's LoRA op refuses operands outside its contract (one device; x [..., K],
weight [N, K], bias [N], lora_A [cap, K], lora_B [N, cap]) with a ValueError naming the op and
the devices or shapes. The reference op computed on some: a lora_B wider than lora_A's capacity
(its extra columns unused) and a [1, N] bias (broadcast) gave outputs; a 0-d x an IndexError there
and on the extension."""

import pytest
import torch

from cpu_backends import BACKENDS, OPS, op_for


def operands(**swap):
    gen = torch.Generator().manual_seed(0)
    shapes = dict(x=(3, 4), weight=(5, 4), bias=(5,), lora_A=(2, 4), lora_B=(5, 2))
    shapes.update(swap)
    return {name: torch.randn(s, generator=gen) for name, s in shapes.items()}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("swap, match", [
    (dict(lora_B=(5, 3)), r"lora_B is \(5, 3\), expected \[5, 2\]"),
    (dict(bias=(1, 5)), r"bias is \(1, 5\), expected \[5\]"),
    (dict(x=()), r"x must have at least one dimension"),
    (dict(lora_A=(2, 5)), r"lora_A is \(2, 5\), expected \[capacity, 4\]"),
    (dict(x=(3, 5)), r"x has last dim 5"),
    (dict(weight=(1, 5, 4)), r"weight, lora_A, lora_B must be 2-D, got shapes \(1, 5, 4\)"),
], ids=lambda v: "-".join(v) if isinstance(v, dict) else None)
def test_shape_outside_the_contract_is_refused(backend, swap, match):
    with pytest.raises(ValueError, match=rf"{OPS[backend]}: {match}"):
        op_for(backend)(**operands(**swap), rank=1, scaling=1.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("on_meta", ["weight", "bias", "lora_A", "lora_B"])
@pytest.mark.parametrize("p", [0.0, 0.5])
def test_meta_operand_beside_cpu_ones_is_refused(backend, on_meta, p):
    """The reference and the extension's op returned a CPU tensor of uninitialised memory."""
    args = operands()
    args[on_meta] = args[on_meta].to("meta")
    with pytest.raises(ValueError, match=rf"{OPS[backend]}: all tensors must be on one device, got .*'{on_meta}': "
                                         r"device\(type='meta'\)"):
        op_for(backend)(**args, rank=1, scaling=1.0, dropout_p=p, seed=3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rank, error, match", [
    (True, TypeError, r"rank must be an int, got True"), (1.0, TypeError, r"rank must be an int, got 1.0"),
    (-1, ValueError, r"rank -1 outside \[0, capacity = 2\]"), (3, ValueError, r"rank 3 outside \[0, capacity = 2\]"),
])
def test_rank_that_is_no_int_in_range_is_refused(backend, rank, error, match):
    """The reference and the extension's op ran rank=True as rank 1; rank=1.0 failed in a slice
    (reference) or the op schema (extension) without naming the op."""
    with pytest.raises(error, match=rf"{OPS[backend]}: {match}"):
        op_for(backend)(**operands(), rank=rank, scaling=1.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scaling, error, match", [
    (float("nan"), ValueError, r"scaling must be finite, got nan"),
    (float("inf"), ValueError, r"scaling must be finite, got inf"),
    (-float("inf"), ValueError, r"scaling must be finite, got -inf"),
    ("2", TypeError, r"scaling must be a real number \(a Python float\), got '2'"),
    (torch.tensor(2.0), TypeError, r"scaling must be a real number \(a Python float\), got tensor\(2\.\)"),
    (True, TypeError, r"scaling must be a real number \(a Python float\), got True"),
    (None, TypeError, r"scaling must be a real number \(a Python float\), got None"),
], ids=repr)
def test_scaling_that_is_no_finite_real_is_refused(backend, scaling, error, match):
    """The reference and the extension's op returned nan outputs for a nan or inf scaling, and
    read '2' as 2.0, where the Triton op refused them (with a TypeError for nan)."""
    with pytest.raises(error, match=rf"{OPS[backend]}: {match}"):
        op_for(backend)(**operands(), rank=1, scaling=scaling)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p, error, match", [
    (1.0, ValueError, r"dropout_p 1.0 must be in \[0, 1\)"), (-0.25, ValueError, r"dropout_p -0.25 must be in \[0, 1\)"),
    (float("nan"), ValueError, r"dropout_p nan must be in \[0, 1\)"),
    (torch.tensor(0.5), TypeError, r"dropout_p must be a real number \(a Python float\), got tensor\(0\.5000\)"),
    ("0.5", TypeError, r"dropout_p must be a real number \(a Python float\), got '0.5'"),
    (True, TypeError, r"dropout_p must be a real number \(a Python float\), got True"),
], ids=repr)
def test_dropout_p_that_is_no_real_in_range_is_refused(backend, p, error, match):
    """The extension's op raised its C++ RuntimeError for p = 1 or nan (naming lorambo::lora_linear_fwd),
    the reference a bare TypeError for '0.5'; both ran a tensor p that the Triton op refused."""
    with pytest.raises(error, match=rf"{OPS[backend]}: {match}"):
        op_for(backend)(**operands(), rank=1, scaling=1.0, dropout_p=p, seed=3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_finite_scalings_and_probabilities_at_the_range_ends_are_taken(backend):
    """The checks let through what the contract allows: an int, negative or zero scaling, p = 0."""
    x, w, b, a, bb = (t.double() for t in operands().values())
    for scaling in (2, -0.5, 0.0):
        for p in (0.0, 0):
            y = op_for(backend)(**operands(), rank=1, scaling=scaling, dropout_p=p, seed=3)
            expected = x @ w.t() + b + scaling * (x @ a[:1].t()) @ bb[:, :1].t()
            torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_dimensional_x_is_one_token(backend):
    """x [K] is the contract's [..., K] with no leading dims: y [N] and its gradients equal the
    float64 formula's (kills the check_shapes mutant that refused x.dim() <= 1)."""
    args = operands(x=(4,))
    leaves = {n: t.clone().requires_grad_(n in ("x", "lora_A", "lora_B")) for n, t in args.items()}
    y = op_for(backend)(**leaves, rank=1, scaling=0.5)
    ref = {n: t.double().requires_grad_(n in ("x", "lora_A", "lora_B")) for n, t in args.items()}
    y64 = (ref["weight"] @ ref["x"] + ref["bias"]
           + 0.5 * ref["lora_B"][:, :1] @ (ref["lora_A"][:1] @ ref["x"]))
    assert y.shape == (5,)
    torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-5)
    g = torch.randn(5, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad(y, [leaves[n] for n in ("x", "lora_A", "lora_B")], g)
    grads64 = torch.autograd.grad(y64, [ref[n] for n in ("x", "lora_A", "lora_B")], g.double())
    for got, want in zip(grads, grads64):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("other", ["x", "weight", "bias", "lora_A", "lora_B"])
def test_operands_of_two_dtypes_are_refused(backend, other):
    """The reference op raised torch's matmul error (naming no op nor operand), the extension's its
    C++ RuntimeError; the Triton op a TypeError naming every operand's dtype, as all do now."""
    args = operands()
    args[other] = args[other].to(torch.bfloat16)
    with pytest.raises(TypeError, match=rf"{OPS[backend]}: all tensors must share one dtype, got .*'{other}': "
                                        r"torch.bfloat16"):
        op_for(backend)(**args, rank=1, scaling=1.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["x", "weight", "bias", "lora_A", "lora_B"])
def test_operand_that_is_no_tensor_is_refused(backend, name):
    """A list operand was an AttributeError ('list' object has no attribute 'device') in the
    reference and extension ops; the Triton op did not type-check the bias."""
    args = operands()
    args[name] = args[name].tolist()
    with pytest.raises(TypeError, match=rf"{OPS[backend]}: {name} must be a torch.Tensor, got list"):
        op_for(backend)(**args, rank=1, scaling=1.0)
