"""The persistent TMA-descriptor GEMM (the Hopper fast path), forced on with LORAMBO_TMA=1.

Under TRITON_INTERPRET=1 host descriptors run on CPU (triton >= 3.4), so CI checks the kernel's
math; its speed and its compilation for sm_90 are only checked on a GPU.
"""

import pytest
import torch
from lora_oracle import assert_close64, make_inputs, multiplier_for, run_all

from lorambo_kernels import config, fused_gemm

pytestmark = pytest.mark.skipif(not config.tma_available(), reason="triton has no host TMA descriptors")


@pytest.fixture
def tma_launches(monkeypatch):
    """Force the TMA path and count its launches."""
    monkeypatch.setenv("LORAMBO_TMA", "1")
    calls = []
    kernel = fused_gemm._lora_gemm_tma_kernel

    class Counting:
        def __getitem__(self, grid):
            calls.append(grid)
            return kernel[grid]

    monkeypatch.setattr(fused_gemm, "_lora_gemm_tma_kernel", Counting())
    return calls


@pytest.mark.parametrize("m,k,n,cap,rank,p,w_grad", [
    (40, 48, 32, 8, 5, 0.0, True),    # aligned sizes, partial M tile, dW through a transposed operand
    (24, 32, 48, 16, 16, 0.3, False),  # dropout: t from lora_down, mask in the dX epilogue
])
def test_tma_path_matches_float64(m, k, n, cap, rank, p, w_grad, tma_launches, device):
    if device.type == "cuda" and config.capability(device)[0] < 9:
        pytest.skip("TMA needs sm_90+")
    seed = 5
    inputs = make_inputs(m, k, n, cap, w_grad=w_grad, device=device)
    mask = multiplier_for(seed, m, k, p, device) if p else None
    y, grads, y64, grads64 = run_all(inputs, rank, 0.9, dropout_p=p, seed=seed if p else None, mask=mask)
    assert len(tma_launches) >= 2, "forward and dX should both run the TMA kernel"
    assert_close64(y, y64, what="y")
    for name, g in grads.items():
        assert_close64(g, grads64[name], what=f"d{name}")


def test_tma_path_with_a_strided_bias(tma_launches, device):
    if device.type == "cuda" and config.capability(device)[0] < 9:
        pytest.skip("TMA needs sm_90+")
    inputs = make_inputs(24, 32, 32, 8, device=device)
    fused = torch.randn(64, dtype=torch.float64).to(device=device, dtype=torch.float32).requires_grad_(True)
    inputs["bias"] = fused[::2]  # the epilogue once read 32 consecutive elements from its start
    y, grads, y64, grads64 = run_all(inputs, 5, 0.9)
    assert tma_launches
    assert_close64(y, y64, what="y")
    for name, g in grads.items():
        assert_close64(g, grads64[name], what=f"d{name}")


def test_unaligned_shapes_fall_back_to_pointer_path(tma_launches, device):
    # K = 13 fp32: the row stride (52 bytes) is not 16-byte aligned, so no descriptor for x.
    inputs = make_inputs(9, 13, 16, 4, device=device)
    y, grads, y64, grads64 = run_all(inputs, 3, 1.0)
    assert_close64(y, y64, what="y")
    assert tma_launches == []


def test_tma_build_failure_warns_once_and_uses_the_pointer_kernel(monkeypatch, device):
    monkeypatch.setenv("LORAMBO_TMA", "1")
    monkeypatch.setattr(fused_gemm, "_tma_disabled", None)
    monkeypatch.setattr(fused_gemm, "_TMA_BUILD_ERRORS", (RuntimeError,))

    class Broken:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                raise RuntimeError("no TMA for you")
            return launch

    monkeypatch.setattr(fused_gemm, "_lora_gemm_tma_kernel", Broken())
    inputs = make_inputs(16, 32, 16, 4, device=device)
    with pytest.warns(RuntimeWarning, match="no TMA for you"):
        y, grads, y64, grads64 = run_all(inputs, 2, 1.0)
    assert "no TMA for you" in fused_gemm._tma_disabled
    assert_close64(y, y64, what="y")
    for name, g in grads.items():
        assert_close64(g, grads64[name], what=f"d{name}")
