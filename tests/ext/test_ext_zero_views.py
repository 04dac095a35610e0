"""lorambo::zero_views_ (the inactive slots after optimizer steps) against torch's zero_()."""

import pytest
import torch
from ext_testutil import needs_ext

pytestmark = needs_ext

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int64, torch.bool, torch.complex64]
SPECIAL = torch.tensor([-0.0, float("nan"), float("inf"), -float("inf")], dtype=torch.float64)


def _filled(shape, dtype, gen):
    values = torch.randn(shape, generator=gen, dtype=torch.float64) * 100
    n = min(len(SPECIAL), values.numel())
    values.view(-1)[:n] = SPECIAL[:n]
    return values.to(dtype) if dtype.is_floating_point or dtype.is_complex else (values != 0).to(dtype)


def _cut(pools):
    return [pools[0][5:],         # lora_A's inactive rows: contiguous
            pools[1][:, 3:],      # lora_B's inactive columns: one run per row
            pools[2][:, 1:, 2:],  # other strides: zero_() itself
            pools[3].t()[:, 6:],  # columns of a transposed pool (stride 1 across rows)
            pools[4][:, :],       # empty
            pools[5]]             # a whole one-element tensor


@pytest.mark.parametrize("dtype", DTYPES)
def test_zeroes_exactly_what_zero_does(dtype):
    gen = torch.Generator().manual_seed(0)
    pools = [_filled(shape, dtype, gen) for shape in [(16, 24), (24, 16), (6, 5, 4), (8, 8), (3, 0), (1,)]]
    expected = [p.clone() for p in pools]
    for view in _cut(expected):
        view.zero_()
    views = _cut(pools)
    versions = [v._version for v in views]
    torch.ops.lorambo.zero_views_(views)
    for got, want in zip(pools, expected):  # the zeroed parts, and everything around them untouched
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))  # bit for bit: +0.0, never -0.0
    assert all(v._version > old for v, old in zip(views[:4], versions[:4]))  # as zero_() marks its tensor


def test_opcheck():
    gen = torch.Generator().manual_seed(6)
    pools = [torch.randn(8, 5, generator=gen), torch.randn(5, 8, generator=gen, dtype=torch.float64)]
    torch.library.opcheck(torch.ops.lorambo.zero_views_.default, ([pools[0][3:], pools[1][:, 2:]],))


def test_a_meta_tensor_in_a_cpu_list_is_refused_not_skipped():
    # the list dispatches to the fake implementation, which used to return without writing
    gen = torch.Generator().manual_seed(8)
    pool = torch.randn(4, 3, generator=gen)
    want = pool.clone()
    with pytest.raises(RuntimeError, match=r"lorambo::zero_views_: tensors\[1\] is on meta but the other tensors "
                                           r"are on cpu"):
        torch.ops.lorambo.zero_views_([pool[2:], torch.empty(2, 3, device="meta")])
    assert torch.equal(pool, want)
    torch.ops.lorambo.zero_views_([torch.empty(2, 3, device="meta")])  # all meta: the fake, fine
