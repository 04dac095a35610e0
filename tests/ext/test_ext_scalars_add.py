"""lorambo::scalars_add_ (the step counts of lorambo.optim.AdamW) against torch's in-place add."""

import pytest
import torch
from ext_testutil import needs_ext

pytestmark = needs_ext


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_matches_torch_add_bit_for_bit(dtype):
    # counts where + 1 rounds (2**24 in float32, 256 in bfloat16) and a view into a larger tensor
    values = [0.0, 1.0, 7.0, 255.0, 256.0, 2048.0, 2.0**24, 2.0**53, -3.5, float("inf"), float("nan")]
    base = torch.tensor(values * 2, dtype=dtype)
    counts = [torch.tensor(v, dtype=dtype) for v in values] + [base[i] for i in range(len(values))]
    want = [c.clone() for c in counts]
    for c in want:
        c.add_(1.0)
    versions = [c._version for c in counts]
    torch.ops.lorambo.scalars_add_(counts, 1.0)
    for got, expected in zip(counts, want):
        torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True)
    assert all(c._version > v for c, v in zip(counts, versions))  # as an in-place op marks its tensor
    torch.testing.assert_close(base[len(values):], torch.tensor(values, dtype=dtype), rtol=0, atol=0,
                               equal_nan=True)  # the elements not in the list stay


def test_leaves_other_elements_and_refuses_more_than_one():
    base = torch.arange(4.0)
    torch.ops.lorambo.scalars_add_([base[1], base[1]], 2.0)
    assert base.tolist() == [0.0, 5.0, 2.0, 3.0]
    first = torch.zeros(())
    with pytest.raises(RuntimeError, match=r"tensors\[1\] has 3 elements"):
        torch.ops.lorambo.scalars_add_([first, torch.zeros(3)], 1.0)
    assert first.item() == 0.0  # checked before anything changed


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_refuses_integer_and_bool_counts_before_changing_any(dtype):
    gen = torch.Generator().manual_seed(2)
    first = torch.randn((), generator=gen, dtype=torch.float64)
    want = first.clone()
    with pytest.raises(RuntimeError, match=r"lorambo::scalars_add_: tensors\[1\] has dtype"):
        torch.ops.lorambo.scalars_add_([first, torch.ones(1, dtype=dtype)], 1.0)
    assert torch.equal(first, want)  # checked before anything changed


@pytest.mark.parametrize("bad", [torch.empty(3), torch.empty(1, dtype=torch.int64)], ids=["3 elements", "int64"])
def test_fake_implementation_refuses_what_the_kernel_refuses(bad):
    # meta tensors (torch.compile's fake tensors) take lorambo/ext/fake.py, not the CPU kernel
    with pytest.raises(RuntimeError, match=r"lorambo::scalars_add_: tensors\[1\] has"):
        torch.ops.lorambo.scalars_add_([torch.empty(1, device="meta"), bad.to("meta")], 1.0)
    with pytest.raises(RuntimeError, match=r"lorambo::scalars_add_: tensors\[1\] has"):
        torch.ops.lorambo.scalars_add_([torch.ones(1), bad.fill_(1)], 1.0)


def test_opcheck():
    gen = torch.Generator().manual_seed(3)
    counts = [torch.randn(1, generator=gen), torch.randn((), generator=gen, dtype=torch.float64),
              torch.randn(1, 1, generator=gen).to(torch.bfloat16)]
    torch.library.opcheck(torch.ops.lorambo.scalars_add_.default, (counts, 1.0))


def test_a_meta_tensor_in_a_cpu_list_is_refused_not_skipped():
    count = torch.randn(1, generator=torch.Generator().manual_seed(4))
    want = count.clone()
    with pytest.raises(RuntimeError, match=r"lorambo::scalars_add_: tensors\[1\] is on meta but the other tensors "
                                           r"are on cpu"):
        torch.ops.lorambo.scalars_add_([count, torch.empty(1, device="meta")], 1.0)
    assert torch.equal(count, want)
