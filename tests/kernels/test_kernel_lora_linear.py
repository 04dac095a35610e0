"""Fused Triton LoRA forward/backward vs a float64 oracle: outputs and every gradient.

Runs under TRITON_INTERPRET=1 on CPU (tiny shapes) and on CUDA when present.
"""

import pytest
import torch
from lora_oracle import assert_close64, assert_tolerance_rule, make_inputs, multiplier_for, run_all

from lorambo.ops.lora_linear_ref import lora_linear_reference


# (m, k, n, cap, rank, bias, w_grad): r=1, r=cap, r inside a bucket, odd M/K/N, M=1, rank 0,
# bias or none, a trainable base weight.
CASES = [
    (1, 5, 3, 3, 1, True, False),       # M = 1, r = 1, tiny K/N (smaller than one block)
    (7, 13, 11, 8, 8, False, False),    # r = cap, no bias, odd sizes
    (37, 45, 29, 12, 5, True, True),    # r inside the 16 bucket, several tiles, dW
    (20, 33, 18, 24, 17, True, False),  # r in the 32 bucket (17)
    (6, 10, 9, 4, 0, True, True),       # rank 0: base layer only, pools get zero gradient
]


@pytest.mark.parametrize("m,k,n,cap,rank,bias,w_grad", CASES)
def test_forward_and_gradients_match_float64(m, k, n, cap, rank, bias, w_grad, device):
    inputs = make_inputs(m, k, n, cap, bias=bias, w_grad=w_grad, device=device)
    y, grads, y64, grads64 = run_all(inputs, rank, scaling=1.7)
    assert y.shape == (m, n) and y.dtype == torch.float32
    assert_close64(y, y64, what="y")
    assert set(grads) == set(grads64)
    for name, g in grads.items():
        assert g.shape == inputs[name].shape and g.dtype == inputs[name].dtype, name
        if name == "lora_A":
            assert torch.equal(g[rank:], torch.zeros_like(g[rank:])), "inactive rows of dA must be exactly 0"
        if name == "lora_B":
            assert torch.equal(g[:, rank:], torch.zeros_like(g[:, rank:])), "inactive cols of dB must be exactly 0"
        assert_close64(g, grads64[name], what=f"d{name}")



@pytest.mark.parametrize("rank,p", [(0, 0.0), (3, 0.0), (3, 0.5)])
def test_forward_returns_the_down_projection_backward_takes(rank, p, device):
    # t = drop(x) A_r^T [M, r] (empty [M, 0] at rank 0): the op saves it for dB and its fake
    # implementation promises this shape.
    from lorambo_kernels.lora_linear import lora_linear_forward

    inputs = {n: t.detach() for n, t in make_inputs(6, 10, 9, 4, device=device).items()}
    y, t = lora_linear_forward(**inputs, rank=rank, scaling=1.7, dropout_p=p, seed=5)
    x64, a64 = inputs["x"].double(), inputs["lora_A"].double()
    if p:
        x64 = x64 * multiplier_for(5, 6, 10, p, device)
    assert t.shape == (6, rank) and t.dtype == inputs["x"].dtype
    if rank:
        assert_close64(t, x64 @ a64[:rank].t(), what="t")

def test_rank_above_the_largest_bucket_loops_over_chunks(device):
    # r = 130 > 128: the down-projection runs as its own kernel and the epilogue loops over r.
    inputs = make_inputs(3, 136, 20, 136, bias=True, device=device)
    y, grads, y64, grads64 = run_all(inputs, 130, scaling=0.3)
    assert_close64(y, y64, what="y")
    for name, g in grads.items():
        assert_close64(g, grads64[name], what=f"d{name}")
    assert torch.equal(grads["lora_A"][130:], torch.zeros_like(grads["lora_A"][130:]))


@pytest.mark.parametrize("scaling", [0.0, 3e-5, 2e4])
def test_extreme_scaling_uses_a_separate_accumulator(scaling, device):
    # |s| outside [1e-4, 1e4] (and s = 0) is not folded into the base accumulator.
    inputs = make_inputs(17, 20, 18, 4, device=device)
    y, grads, y64, grads64 = run_all(inputs, 3, scaling)
    assert_close64(y, y64, what="y")
    for name, g in grads.items():
        assert_close64(g, grads64[name], what=f"d{name}")


def test_three_dimensional_and_non_contiguous_input(device):
    inputs = make_inputs(None, 12, 10, 8, lead=(4, 3), device=device)
    x = inputs["x"].detach().transpose(0, 1).requires_grad_(True)  # (3, 4, 12), non-contiguous
    assert not x.is_contiguous()
    inputs["x"] = x
    y, grads, y64, grads64 = run_all(inputs, 6, scaling=0.5)
    assert y.shape == (3, 4, 10)
    assert_close64(y, y64, what="y")
    assert grads["x"].shape == x.shape
    for name, g in grads.items():
        assert_close64(g, grads64[name], what=f"d{name}")


def test_transposed_weight_view_like_conv1d(device):
    # transformers' Conv1D stores W as [in, out]; LoRAMBoLinear passes the [out, in] view.
    inputs = make_inputs(9, 14, 11, 4, device=device)
    w_in_out = inputs["weight"].detach().t().contiguous()  # (K, N) storage
    inputs["weight"] = w_in_out.t()  # (N, K) view with strides (1, N)
    y, grads, y64, grads64 = run_all(inputs, 3, scaling=2.0)
    assert_close64(y, y64, what="y")
    for name, g in grads.items():
        assert_close64(g, grads64[name], what=f"d{name}")


@pytest.mark.parametrize("rank", [3, 0])
def test_strided_bias(rank, device):
    # A bias that is a strided view (a Parameter made from every other element of a fused bias):
    # the epilogue loaded N consecutive elements from its start.
    inputs = make_inputs(5, 8, 6, 4, device=device)
    fused = torch.randn(12, dtype=torch.float64).to(device=device, dtype=torch.float32).requires_grad_(True)
    inputs["bias"] = fused[::2]
    assert not inputs["bias"].is_contiguous()
    y, grads, y64, grads64 = run_all(inputs, rank, scaling=0.9)
    assert_close64(y, y64, what="y")
    for name, g in grads.items():
        assert_close64(g, grads64[name], what=f"d{name}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_within_twice_torch_error(dtype, device):
    m, k, n, cap, rank = 33, 40, 24, 16, 7
    inputs = make_inputs(m, k, n, cap, dtype=dtype, device=device, w_grad=True)
    gy = torch.randn(m, n, dtype=torch.float64, device=device).to(dtype)
    y, grads, y64, grads64 = run_all(inputs, rank, scaling=0.8, grad_y=gy)
    assert y.dtype == dtype
    # PyTorch's own error: the reference op in the same dtype on the same inputs
    ref_in = {n_: (None if t is None else t.detach().requires_grad_(t.requires_grad)) for n_, t in inputs.items()}
    y_ref = lora_linear_reference(**ref_in, rank=rank, scaling=0.8)
    wrt = list(grads)
    g_ref = dict(zip(wrt, torch.autograd.grad(y_ref, [ref_in[n_] for n_ in wrt], gy)))
    assert_tolerance_rule(y, y_ref, y64, what=f"y {dtype}")
    for name in wrt:
        assert grads[name].dtype == dtype
        assert_tolerance_rule(grads[name], g_ref[name], grads64[name], what=f"d{name} {dtype}")


def test_matches_reference_op_exactly_shaped_and_without_dropout(device):
    # Same semantics as the reference op (the torch backend) at p = 0.
    inputs = make_inputs(5, 16, 8, 4, device=device)
    from lorambo.ops.triton_linear import lora_linear_triton

    y = lora_linear_triton(**inputs, rank=2, scaling=1.0)
    y_ref = lora_linear_reference(**inputs, rank=2, scaling=1.0)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)


def test_rank_buckets_share_one_compiled_variant(monkeypatch, device):
    """Every launch for ranks 1..16 passes the same constexprs (so one compile per bucket):
    the rank is a run-time argument, excluded from specialisation."""
    from lorambo_kernels import fused_gemm, lora_skinny
    from lorambo_kernels.config import rank_bucket

    seen = {}

    class Recorder:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.setdefault(self.name, set()).add(tuple(sorted(kwargs.items())))
                return self.kernel[grid](*args, **kwargs)
            return launch

    for mod, attr in ((fused_gemm, "_lora_gemm_kernel"), (lora_skinny, "_lora_wgrad_kernel")):
        monkeypatch.setattr(mod, attr, Recorder(attr, getattr(mod, attr)))
    for rank in (1, 5, 16):
        inputs = make_inputs(4, 16, 16, 16, device=device)
        run_all(inputs, rank, scaling=1.0)
    # forward GEMM, dX GEMM: two constexpr sets; wgrad: dA and dB (with bias colsum): two
    assert len(seen["_lora_gemm_kernel"]) == 2 and len(seen["_lora_wgrad_kernel"]) == 2
    assert [rank_bucket(r) for r in (1, 16, 17, 32, 33, 64, 65, 128, 129, 1000)] == \
        [16, 16, 32, 32, 64, 64, 128, 128, 128, 128]
    for kernel in (fused_gemm._lora_gemm_kernel.kernel, lora_skinny._lora_wgrad_kernel.kernel):
        dns = getattr(kernel, "do_not_specialize", None)
        if dns is not None:  # JITFunction (GPU); the interpreter has no specialisation
            assert "rank" in [kernel.arg_names[i] if isinstance(i, int) else i for i in dns]


@pytest.mark.parametrize("rank,p,forward_downs,backward_downs", [(5, 0.0, 0, 0), (5, 0.3, 1, 0), (130, 0.0, 1, 1)])
def test_down_projection_runs_in_the_gemm_up_to_rank_128(monkeypatch, rank, p, forward_downs, backward_downs,
                                                         device):
    """docs/performance.md's traffic floor: at p = 0 and r <= 128 the forward's t, and at r <= 128
    the backward's t' (dX and dA wanted), come out of the GEMMs' K-loops; only dropout (forward)
    or r > 128 take a separate lora_down launch. Outputs and gradients match float64 either way."""
    from lorambo_kernels import lora_linear, lora_skinny

    ranks = []
    monkeypatch.setattr(lora_linear, "lora_down",
                        lambda *args, **kwargs: ranks.append(args[2]) or lora_skinny.lora_down(*args, **kwargs))
    inputs = make_inputs(3, 8, 12, 131, device=device)
    mask = multiplier_for(3, 3, 8, p, device) if p else None
    y, grads, y64, grads64 = run_all(inputs, rank, scaling=0.7, dropout_p=p, seed=3, mask=mask)
    # run_all runs the forward twice (the output, then the gradients) and the backward once
    assert ranks == [rank] * (2 * forward_downs + backward_downs)
    assert_close64(y, y64, what="y")
    for name, g in grads.items():
        assert_close64(g, grads64[name], what=f"d{name}")


@pytest.mark.parametrize("colsum", [False, True])
def test_weight_gradient_of_an_empty_batch_is_written_as_zeros(colsum, device):
    # M = 0 (an empty batch): dA / dB slices and the fused bias gradient (empty buffers the
    # launcher fills) are sums over no rows, zero, not whatever the memory held.
    from lorambo_kernels.lora_skinny import lora_wgrad

    out = torch.full((7, 3), float("nan"), device=device)
    colsum_out = torch.full((7,), float("nan"), device=device) if colsum else None
    lora_wgrad(torch.randn(0, 7, device=device), torch.randn(0, 3, device=device), 1.3, out, colsum_out=colsum_out)
    assert torch.equal(out, torch.zeros_like(out))
    if colsum:
        assert torch.equal(colsum_out, torch.zeros_like(colsum_out))
