"""``lorambo_kernels.common.downcast``: fp32 -> bf16 / fp16 rounded to nearest even under the
interpreter ("upcast"), bit for bit as torch's own conversion (the interpreter itself truncates
bf16)."""

import pytest
import torch
import triton
import triton.language as tl

from lorambo_kernels.common import downcast


@triton.jit
def _downcast_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    ok = offs < n
    x = tl.load(x_ptr + offs, mask=ok)
    tl.store(out_ptr + offs, downcast(x, out_ptr.dtype.element_ty, "upcast"), mask=ok)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # fp16 inf, as torch
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_downcast_rounds_to_nearest_even_like_torch(dtype):
    """bf16 through the bit rounding; fp16 (also under "upcast") through the plain cast."""
    # exact ties with an even and an odd last kept bit, one bit either side of a tie, and random
    # values of both signs and wide exponents
    ties = torch.tensor([0x3F808000, 0x3F818000, 0x3F807FFF, 0x3F808001, 0x3F818001, 0x3F817FFF,
                         0xBF808000, 0xBF818000, 0x4B7F8000], dtype=torch.int64).to(torch.int32)
    gen = torch.Generator().manual_seed(0)
    rand = torch.randn(100, generator=gen) * torch.exp2(torch.randint(-20, 20, (100,), generator=gen).float())
    x = torch.cat([ties.view(torch.float32), rand])
    out = torch.empty(x.shape, dtype=dtype)
    _downcast_kernel[(1,)](x, out, x.numel(), BLOCK=triton.next_power_of_2(x.numel()))
    want = x.to(dtype)
    assert torch.equal(out.view(torch.int16), want.view(torch.int16)), (out - want).nonzero()
