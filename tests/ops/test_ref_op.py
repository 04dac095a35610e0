"""The reference LoRA op against a float64 plain-autograd oracle: outputs and every gradient."""

import pytest
import torch

from lorambo.ops import dropout_mask, lora_linear_reference


def oracle(x, weight, bias, a, b, rank, scaling, mask=None):
    """Plain autograd formula, active slice only."""
    xd = x if mask is None else x * mask
    y = x @ weight.t() + (0 if bias is None else bias)
    return y + scaling * (xd @ a[:rank].t()) @ b[:, :rank].t()


def make(m, k, n, cap, bias=True, dtype=torch.float64):
    x = torch.randn(m, k, dtype=dtype, requires_grad=True)
    w = torch.randn(n, k, dtype=dtype, requires_grad=True)
    bvec = torch.randn(n, dtype=dtype, requires_grad=True) if bias else None
    a = torch.randn(cap, k, dtype=dtype, requires_grad=True)
    b = torch.randn(n, cap, dtype=dtype, requires_grad=True)
    return x, w, bvec, a, b


def inputs_of(x, w, bvec, a, b):
    return [t for t in (x, w, bvec, a, b) if t is not None]


@pytest.mark.parametrize("m,k,n,cap,rank,bias", [
    (1, 5, 3, 3, 1, True), (7, 13, 11, 8, 8, False), (9, 16, 10, 8, 5, True), (4, 6, 6, 4, 0, True),
])
def test_forward_and_all_gradients_match_float64_oracle(m, k, n, cap, rank, bias):
    x, w, bvec, a, b = make(m, k, n, cap, bias)
    scaling = 1.7
    y = lora_linear_reference(x, w, bvec, a, b, rank, scaling)
    y_ref = oracle(x, w, bvec, a, b, rank, scaling)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    gy = torch.randn_like(y)
    got = torch.autograd.grad(y, inputs_of(x, w, bvec, a, b), gy)
    want = torch.autograd.grad(y_ref, inputs_of(x, w, bvec, a, b), gy)
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


def test_inactive_slots_get_exactly_zero_gradient():
    x, w, bvec, a, b = make(6, 10, 7, 6)
    y = lora_linear_reference(x, w, bvec, a, b, 3, 2.0)
    ga, gb = torch.autograd.grad(y.square().sum(), (a, b))
    assert torch.equal(ga[3:], torch.zeros_like(ga[3:])) and torch.equal(gb[:, 3:], torch.zeros_like(gb[:, 3:]))
    assert ga[:3].abs().min() > 0 and gb[:, :3].abs().min() > 0


def test_three_dimensional_input_and_non_contiguous():
    x, w, bvec, a, b = make(4 * 5, 8, 6, 4)
    x3 = x.detach().reshape(4, 5, 8).transpose(0, 1).requires_grad_(True)  # (5, 4, 8), non-contiguous
    y = lora_linear_reference(x3, w, bvec, a, b, 3, 0.5)
    assert y.shape == (5, 4, 6)
    y_ref = oracle(x3, w, bvec, a, b, 3, 0.5)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    gy = torch.randn_like(y)
    for g, e in zip(torch.autograd.grad(y, (x3, a, b), gy), torch.autograd.grad(y_ref, (x3, a, b), gy)):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


def test_dropout_uses_the_same_mask_in_forward_and_backward():
    x, w, bvec, a, b = make(12, 9, 5, 4)
    p, seed = 0.3, 1234
    mask = dropout_mask(x.detach(), p, seed)
    assert 0 < (mask == 0).sum() < mask.numel()
    torch.testing.assert_close(mask[mask != 0], torch.full_like(mask[mask != 0], 1 / (1 - p)))
    y = lora_linear_reference(x, w, bvec, a, b, 4, 1.3, dropout_p=p, seed=seed)
    y_ref = oracle(x, w, bvec, a, b, 4, 1.3, mask=mask)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    gy = torch.randn_like(y)
    for g, e in zip(torch.autograd.grad(y, (x, a, b), gy), torch.autograd.grad(y_ref, (x, a, b), gy)):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)
    other = lora_linear_reference(x, w, bvec, a, b, 4, 1.3, dropout_p=p, seed=seed + 1)
    assert not torch.allclose(other, y)


@pytest.mark.parametrize("forward_dtype,backward_dtype", [(torch.float64, torch.float32),
                                                           (torch.float32, torch.float64)])
def test_dropout_mask_does_not_follow_the_default_dtype(forward_dtype, backward_dtype):
    # the mask was drawn in torch's default dtype: another default gave another mask, and a
    # default changed between forward and backward gave gradients of another mask than the output's
    torch.manual_seed(3)
    x, w, bvec, a, b = make(6, 9, 5, 4)
    p, seed = 0.5, 1234
    mask = dropout_mask(x.detach(), p, seed)  # under the default float32
    old = torch.get_default_dtype()
    try:
        torch.set_default_dtype(forward_dtype)
        y = lora_linear_reference(x, w, bvec, a, b, 3, 0.8, p, seed)
        torch.set_default_dtype(backward_dtype)
        gy = torch.randn(y.shape, dtype=torch.float64)
        got = torch.autograd.grad(y, (x, w, bvec, a, b), gy)
    finally:
        torch.set_default_dtype(old)
    y_ref = oracle(x, w, bvec, a, b, 3, 0.8, mask)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    for g, r in zip(got, torch.autograd.grad(y_ref, (x, w, bvec, a, b), gy)):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)


def test_dropout_without_seed_is_rejected():
    x, w, bvec, a, b = make(2, 4, 3, 2)
    with pytest.raises(ValueError, match="seed"):
        lora_linear_reference(x, w, bvec, a, b, 2, 1.0, dropout_p=0.1)


@pytest.mark.parametrize("rank, p, match", [
    (-1, 0.0, r"rank -1 outside \[0, capacity = 3\]"), (4, 0.0, r"rank 4 outside \[0, capacity = 3\]"),
    (2, 1.0, r"dropout_p 1.0 must be in \[0, 1\)"), (2, -0.1, r"dropout_p -0.1 must be in \[0, 1\)"),
])
def test_bad_rank_or_dropout_is_refused(rank, p, match):
    """What the extension's and the Triton op refuse. The reference computed on: rank -1 sliced
    A[:-1] (every slot but the last), rank > capacity clipped, p = 1 gave NaN, p < 0 no dropout."""
    x, w, bvec, a, b = make(4, 5, 6, 3)
    with pytest.raises(ValueError, match=match):
        lora_linear_reference(x, w, bvec, a, b, rank, 1.0, dropout_p=p, seed=3)


def test_complex_inputs_are_refused():
    """The backward has no complex conjugates: complex inputs got silently wrong gradients."""
    x, w, bvec, a, b = (t.detach().to(torch.complex128).requires_grad_() for t in make(3, 4, 5, 2))
    with pytest.raises(TypeError, match=r"lora_linear_reference: x has dtype torch.complex128"):
        lora_linear_reference(x, w, bvec, a, b, 2, 1.0)


def test_frozen_weight_gets_no_gradient_work():
    x, w, bvec, a, b = make(5, 6, 4, 3)
    w.requires_grad_(False)
    y = lora_linear_reference(x, w, bvec, a, b, 2, 1.0)
    y.sum().backward()
    assert w.grad is None and a.grad is not None


def test_gradcheck_and_double_backward():
    x, w, bvec, a, b = make(3, 4, 3, 3)

    def f(x, w, bvec, a, b):
        return lora_linear_reference(x, w, bvec, a, b, 2, 0.7)

    assert torch.autograd.gradcheck(f, (x, w, bvec, a, b))
    assert torch.autograd.gradgradcheck(f, (x, w, bvec, a, b))


def test_hessian_vector_product_of_base_weight_is_exact():
    """HVP w.r.t. the (temporarily differentiable) base weight, as the Hessian estimators use it."""
    x, w, bvec, a, b = make(6, 5, 4, 3)
    v = torch.randn_like(w)

    def loss_ours(w_):
        return lora_linear_reference(x, w_, bvec, a, b, 3, 1.1).tanh().square().sum()

    def loss_ref(w_):
        return oracle(x, w_, bvec, a, b, 3, 1.1).tanh().square().sum()

    _, hv = torch.autograd.functional.hvp(loss_ours, w.detach(), v)
    _, hv_ref = torch.autograd.functional.hvp(loss_ref, w.detach(), v)
    torch.testing.assert_close(hv, hv_ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("rank", [3, 2, 0])
def test_batched_hessian_vector_products_match_float64_oracle(rank):
    """is_grads_batched=True (vmap over the double backward, what the Hessian estimators use on
    GPUs, where ``auto`` runs this op) gives the per-probe products of the float64 oracle. The
    backward used to write the pool gradients into unbatched zeros, which vmap refuses."""
    x, w, bvec, a, b = make(6, 5, 4, 3)
    x, bvec = x.detach(), bvec.detach()
    params = (w, a, b)
    probes = [torch.randn(4, *p.shape, dtype=p.dtype) for p in params]

    def grads(op):
        loss = op(x, w, bvec, a, b, rank, 1.1).tanh().square().sum()
        return torch.autograd.grad(loss, params, create_graph=True)

    got = torch.autograd.grad(grads(lora_linear_reference), params, probes, is_grads_batched=True)
    g_ref = grads(oracle)
    for i in range(4):
        want = torch.autograd.grad(g_ref, params, [v[i] for v in probes], retain_graph=True)
        for g, e in zip(got, want):
            torch.testing.assert_close(g[i], e, rtol=1e-10, atol=1e-10)
