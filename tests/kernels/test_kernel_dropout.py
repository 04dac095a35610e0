"""LoRA-branch dropout in the kernels: a counter-based mask from the seed, the same in forward
and backward, checked against a float64 oracle that uses that mask."""

import pytest
import torch
from lora_oracle import assert_close64, make_inputs, multiplier_for, run_all

from lorambo.ops.triton_linear import lora_linear_triton
from lorambo_kernels import dropout_keep_mask, lora_down, lora_linear_forward


def test_mask_is_a_pure_function_of_seed_and_shape(device):
    a = dropout_keep_mask(7, 33, 70, 0.3, device)
    assert a.dtype == torch.bool and a.shape == (33, 70)
    assert torch.equal(a, dropout_keep_mask(7, 33, 70, 0.3, device))
    assert not torch.equal(a, dropout_keep_mask(8, 33, 70, 0.3, device))
    assert abs(a.float().mean().item() - 0.7) < 0.05
    # element (m, k) depends on (seed, m*K + k) only: a prefix of rows is the same mask
    assert torch.equal(a[:10], dropout_keep_mask(7, 10, 70, 0.3, device))
    # large seeds (the dispatch draws them from [0, 2**62)) work and differ
    big = dropout_keep_mask(2**62 - 3, 33, 70, 0.3, device)
    assert not torch.equal(big, a) and abs(big.float().mean().item() - 0.7) < 0.05
    assert dropout_keep_mask(7, 5, 6, 0.0, device).all()



def test_mask_of_one_row_or_one_column_is_the_flat_prefix(device):
    """Element (m, k) of an [M, K] mask is a function of (seed, m*K + k) alone, so masks of
    shapes [1, n] and [n, 1] (one token, one feature) are the first n elements of any mask in
    row-major order."""
    flat = dropout_keep_mask(11, 3, 40, 0.5, device).flatten()
    for m, k in ((1, 40), (40, 1), (1, 1), (2, 20)):
        assert torch.equal(dropout_keep_mask(11, m, k, 0.5, device).flatten(), flat[:m * k])
    assert dropout_keep_mask(11, 0, 5, 0.5, device).shape == (0, 5)


@pytest.mark.parametrize("p", [1.0, -0.1, float("nan")])
def test_probability_outside_zero_one_is_refused(p, device):
    with pytest.raises(ValueError, match=rf"dropout_keep_mask: p={p} must be in \[0, 1\)"):
        dropout_keep_mask(11, 3, 4, p, device)


@pytest.mark.parametrize("m,k,n,cap,rank,bias", [(19, 37, 21, 8, 6, True), (1, 20, 9, 4, 4, False)])
def test_forward_and_backward_use_the_same_mask(m, k, n, cap, rank, bias, device):
    p, seed, s = 0.25, 1234, 1.3
    inputs = make_inputs(m, k, n, cap, bias=bias, w_grad=True, device=device)
    mask = multiplier_for(seed, m, k, p, device)
    y, grads, y64, grads64 = run_all(inputs, rank, s, dropout_p=p, seed=seed, mask=mask)
    assert_close64(y, y64, what="y")
    for name, g in grads.items():
        assert_close64(g, grads64[name], what=f"d{name}")
    assert torch.equal(grads["lora_A"][rank:], torch.zeros_like(grads["lora_A"][rank:]))
    # the saved t is drop(x) A_r^T with the same mask
    x2 = inputs["x"].detach()
    _, t = lora_linear_forward(x2, inputs["weight"].detach(), None, inputs["lora_A"].detach(),
                               inputs["lora_B"].detach(), rank, s, p, seed)
    assert_close64(t, (x2.double() * mask) @ inputs["lora_A"].detach()[:rank].double().t(), what="t")


def test_same_seed_same_output_other_seed_differs(device):
    inputs = make_inputs(8, 16, 8, 4, device=device)
    args = dict(rank=4, scaling=1.0, dropout_p=0.5)
    y1 = lora_linear_triton(**inputs, seed=3, **args)
    assert torch.equal(y1, lora_linear_triton(**inputs, seed=3, **args))
    assert not torch.equal(y1, lora_linear_triton(**inputs, seed=4, **args))
    with pytest.raises(ValueError, match="seed"):
        lora_linear_triton(**inputs, seed=None, **args)


def test_down_projection_kernel_with_dropout_and_rank_chunks(device):
    # lora_down on its own: r = 140 spans two BLOCK_R=128 chunks of programs.
    x = torch.randn(18, 150, device=device)
    a_t = torch.randn(150, 140, device=device)
    p, seed = 0.4, 99
    t = lora_down(x, a_t, 140, p, seed)
    want = (x.double() * multiplier_for(seed, 18, 150, p, device)) @ a_t.double()
    assert_close64(t, want, what="t")
