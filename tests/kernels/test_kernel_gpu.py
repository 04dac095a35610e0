"""GPU tests (marked ``gpu``, skipped without CUDA): realistic shapes in every dtype against float64
with the tolerance rule of docs/performance.md, CUDA-graph capture (no host sync), one compile per rank bucket."""

import pytest
import torch
from lora_oracle import assert_close64, assert_tolerance_rule, make_inputs, multiplier_for, run_all

from lorambo.ops.lora_linear_ref import lora_linear_reference
from lorambo.ops.triton_linear import lora_linear_triton

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

SHAPES = [  # (M, K, N, capacity, rank)
    (2048, 4096, 4096, 16, 16),
    (512, 4096, 11008, 128, 8),   # rank 8 in a capacity-128 pool
    (1000, 1536, 2304, 64, 37),   # odd M, rank inside the 64 bucket
    (1, 4096, 4096, 64, 64),      # single token
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("m,k,n,cap,rank", SHAPES)
def test_realistic_shapes_tolerance_rule(m, k, n, cap, rank, dtype):
    torch.backends.cuda.matmul.allow_tf32 = False
    inputs = make_inputs(m, k, n, cap, dtype=dtype, device="cuda")
    gy = torch.randn(m, n, device="cuda", dtype=torch.float64).to(dtype)
    y, grads, y64, grads64 = run_all(inputs, rank, 0.5, grad_y=gy)
    ref_in = {n_: (None if t is None else t.detach().requires_grad_(t.requires_grad)) for n_, t in inputs.items()}
    y_ref = lora_linear_reference(**ref_in, rank=rank, scaling=0.5)
    wrt = list(grads)
    g_ref = dict(zip(wrt, torch.autograd.grad(y_ref, [ref_in[n_] for n_ in wrt], gy)))
    if dtype == torch.float32:
        assert_close64(y, y64, rtol=1e-4, what="y")
    else:
        assert_tolerance_rule(y, y_ref, y64, what=f"y {dtype}")
    for name in wrt:
        if dtype == torch.float32:
            assert_close64(grads[name], grads64[name], rtol=1e-4, what=f"d{name}")
        else:
            assert_tolerance_rule(grads[name], g_ref[name], grads64[name], what=f"d{name} {dtype}")


@pytest.mark.parametrize("tma", ["0", "auto"])
def test_dropout_and_both_gemm_paths(tma, monkeypatch):
    monkeypatch.setenv("LORAMBO_TMA", tma)
    m, k, n, cap, rank, p, seed = 1024, 2048, 1024, 32, 20, 0.1, 1234
    inputs = make_inputs(m, k, n, cap, device="cuda", w_grad=True)
    mask = multiplier_for(seed, m, k, p, "cuda")
    y, grads, y64, grads64 = run_all(inputs, rank, 2.0, dropout_p=p, seed=seed, mask=mask)
    assert_close64(y, y64, rtol=1e-4, what="y")
    for name, g in grads.items():
        assert_close64(g, grads64[name], rtol=1e-4, what=f"d{name}")


def test_cuda_graph_capture_forward_backward():
    """Capture succeeds only if nothing synchronises with the host."""
    inputs = make_inputs(256, 512, 384, 32, dtype=torch.bfloat16, device="cuda")
    x, a, b = inputs["x"], inputs["lora_A"], inputs["lora_B"]

    def step():
        y = lora_linear_triton(x, inputs["weight"], inputs["bias"], a, b, 12, 0.5, dropout_p=0.1, seed=77)
        return (y,) + torch.autograd.grad(y.float().square().sum(), (x, a, b))

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        eager = step()  # warm-up compiles the kernels outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    for c, e in zip(captured, eager):
        torch.testing.assert_close(c, e)


def test_one_compile_per_rank_bucket():
    # On the GPU's own compile cache; test_rank_specialization.py checks the same property for
    # every kernel and path on CPU through the launches' specialization keys.
    from lorambo_kernels import fused_gemm

    kernels = (fused_gemm._lora_gemm_kernel, fused_gemm._lora_gemm_tma_kernel)
    caches = [getattr(k, "device_caches", None) for k in kernels]
    if any(c is None for c in caches):
        pytest.skip("this triton has no JITFunction.device_caches")

    def n_compiled():  # compiled variants of both GEMM kernels (the TMA one runs on sm_90)
        return sum(len(entry[0]) for cache in caches for entry in cache.values())

    inputs = make_inputs(64, 256, 256, 128, dtype=torch.bfloat16, device="cuda")
    with torch.no_grad():
        lora_linear_triton(**inputs, rank=1, scaling=1.0)
        before = n_compiled()
        for rank in range(2, 17):  # the 16 bucket: no new compile
            lora_linear_triton(**inputs, rank=rank, scaling=1.0)
        assert n_compiled() == before
        lora_linear_triton(**inputs, rank=17, scaling=1.0)  # the 32 bucket: one more
        assert n_compiled() == before + 1
