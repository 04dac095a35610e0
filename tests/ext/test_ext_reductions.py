"""lorambo::multi_dot / multi_sq_norm against float64 PyTorch references."""

import pytest
import torch

from ext_testutil import (FLOAT_DTYPES, check_within_accumulation_bound, cpu_kernel, generator, needs_ext,
                          random_dtype, random_shape)

import lorambo
from lorambo.ext import ops as ext_ops
from lorambo.sensitivity.reductions import per_layer_dots, per_layer_sq_norms

pytestmark = needs_ext


def _pairs(n, gen, big=False):
    xs, ys = [], []
    for i in range(n):
        shape = (70001,) if big and i == n // 2 else random_shape(gen)  # one tensor spanning 5 chunks
        dx, dy = random_dtype(gen), random_dtype(gen)
        xs.append(torch.randn(shape, generator=gen).to(dx))
        ys.append(torch.randn(shape, generator=gen).to(dy))
    return xs, ys


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_a_sum_of_4m_squares_is_within_the_accumulation_bound(dtype):
    """A float32 lane added 1024 squares in a row, each add rounded relative to the growing total:
    the squared norm of 4M bf16 values was 1.4e-6 off float64 (about u32 sqrt(1024 / 3)), above
    the 4.8e-7 of ACCUMULATION_BOUND (multi_dot of random signs: 1e-11, its partial sums stay
    small). Lengths not a multiple of the 128-element block or of the 16 lanes take the partial block and tail."""
    gen = generator()
    xs = [torch.randn(n, generator=gen).to(dtype) for n in (1 << 22, (1 << 22) + 16 * 5 + 7)]
    check_within_accumulation_bound(ext_ops.multi_sq_norm(xs), xs, xs)
    check_within_accumulation_bound(ext_ops.multi_dot(xs, xs), xs, xs)


@pytest.mark.parametrize("n", [1, 23, 300])
def test_multi_dot_matches_float64_reference(n):
    gen = generator()
    xs, ys = _pairs(n, gen, big=(n == 23))
    check_within_accumulation_bound(ext_ops.multi_dot(xs, ys), xs, ys)


@pytest.mark.parametrize("n", [1, 23, 300])
def test_multi_sq_norm_matches_float64_reference(n):
    gen = generator()
    xs, _ = _pairs(n, gen, big=(n == 23))
    check_within_accumulation_bound(ext_ops.multi_sq_norm(xs), xs, xs)


def test_float64_inputs_accumulate_in_float64():
    x = torch.randn(50000, dtype=torch.float64)
    y = torch.randn(50000, dtype=torch.float64)
    torch.testing.assert_close(ext_ops.multi_dot([x], [y])[0, 0], (x * y).sum(), rtol=1e-13, atol=1e-12)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_rows_match_per_layer_reductions(dtype):
    shapes = [(4, 5, 3), (4, 7), (4, 0), (4, 20000)]
    xs = [torch.randn(s).to(dtype) for s in shapes]
    ys = [torch.randn(s).to(dtype) for s in shapes]
    got = ext_ops.multi_dot(xs, ys, rows=4)
    check_within_accumulation_bound(got, xs, ys, rows=4)  # the layout of per_layer_dots, which sums in float64:
    lorambo.set_backend("torch")  # per_layer_* would otherwise run the compiled op under test
    try:
        want = per_layer_dots([x.double() for x in xs], [y.double() for y in ys])
        want_norms = per_layer_sq_norms([x.double() for x in xs])
    finally:
        lorambo.set_backend(None)
    scale = torch.stack([(x.double() * y.double()).abs().flatten(1).sum(1) for x, y in zip(xs, ys)], dim=1)
    assert bool(((got - want).abs() <= 1e-5 * scale).all())
    norms = ext_ops.multi_sq_norm(xs, rows=1)[0]
    torch.testing.assert_close(norms, want_norms, rtol=2e-5, atol=0.0)


def test_non_contiguous_inputs_are_handled():
    base = torch.randn(40, 30)
    views = [base.t(), base[:, ::3], base[5:9, 2:7].t()]
    others = [torch.randn(v.shape).t().contiguous().t() for v in views]
    got = ext_ops.multi_dot(views, others)
    want = ext_ops.multi_dot([v.contiguous() for v in views], [o.contiguous() for o in others])
    assert torch.equal(got, want)
    assert torch.equal(ext_ops.multi_sq_norm(views), ext_ops.multi_sq_norm([v.contiguous() for v in views]))


def test_empty_tensors_and_empty_lists():
    xs = [torch.empty(0), torch.empty(3, 0, 2, dtype=torch.bfloat16), torch.ones(2)]
    assert ext_ops.multi_dot(xs, xs).tolist() == [[0.0, 0.0, 2.0]]
    assert ext_ops.multi_sq_norm(xs).tolist() == [[0.0, 0.0, 2.0]]
    assert ext_ops.multi_dot([], []).shape == (1, 0)
    assert ext_ops.multi_sq_norm([], rows=3).shape == (3, 0)


def test_results_do_not_depend_on_the_thread_count():
    gen = generator()
    xs, ys = _pairs(40, gen, big=True)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ext_ops.multi_dot(xs, ys), ext_ops.multi_sq_norm(xs)
        torch.set_num_threads(max(2, before))
        many = ext_ops.multi_dot(xs, ys), ext_ops.multi_sq_norm(xs)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1])


def test_opcheck():
    xs = [torch.randn(3, 4), torch.randn(5).to(torch.bfloat16), torch.randn(2, 2, dtype=torch.float64)]
    ys = [torch.randn(3, 4).to(torch.float16), torch.randn(5), torch.randn(2, 2)]
    torch.library.opcheck(torch.ops.lorambo.multi_dot.default, (xs, ys, 1))
    torch.library.opcheck(torch.ops.lorambo.multi_sq_norm.default, (xs, 1))
    rows = [torch.randn(2, 3), torch.randn(2, 5, 1)]
    torch.library.opcheck(torch.ops.lorambo.multi_dot.default, (rows, rows, 2))


# ------------------------------------------------------------------------------- bad input
def test_mismatched_list_lengths():
    with pytest.raises(RuntimeError, match=r"multi_dot: xs has 2 tensors but ys has 1"):
        torch.ops.lorambo.multi_dot([torch.ones(2), torch.ones(2)], [torch.ones(2)])
    # the Python entry point answers empty lists itself, but only when both are empty
    for xs, ys in (([], [torch.ones(2)]), ([torch.ones(2)], [])):
        with pytest.raises(RuntimeError, match=rf"multi_dot: xs has {len(xs)} tensors but ys has {len(ys)}"):
            ext_ops.multi_dot(xs, ys)


def test_shape_mismatch_names_the_pair():
    xs = [torch.ones(2), torch.ones(3, 4)]
    ys = [torch.ones(2), torch.ones(4, 3)]
    with pytest.raises(RuntimeError, match=r"xs\[1\] has shape \[3, 4\] but ys\[1\] has shape \[4, 3\]"):
        ext_ops.multi_dot(xs, ys)


def test_unsupported_dtype_names_the_tensor():
    xs = [torch.ones(2), torch.ones(2, dtype=torch.int32)]
    with pytest.raises(RuntimeError, match=r"multi_sq_norm: xs\[1\] has dtype Int; supported dtypes are float32"):
        ext_ops.multi_sq_norm(xs)
    with pytest.raises(RuntimeError, match=r"ys\[0\] has dtype ComplexFloat"):
        ext_ops.multi_dot([torch.ones(2)], [torch.ones(2, dtype=torch.complex64)])


def test_rows_need_a_matching_leading_dimension():
    with pytest.raises(RuntimeError, match=r"xs\[1\] has shape \[3, 2\] but rows=2"):
        ext_ops.multi_sq_norm([torch.ones(2, 5), torch.ones(3, 2)], rows=2)
    with pytest.raises(RuntimeError, match=r"rows must be >= 1, got 0"):
        ext_ops.multi_sq_norm([torch.ones(2)], rows=0)


def test_mixed_devices_are_rejected_by_the_kernel_and_the_fake():
    xs = [torch.ones(3), torch.empty(3, device="meta")]
    with pytest.raises(RuntimeError, match=r"xs\[1\] is on meta but the other tensors are on cpu"):
        cpu_kernel(torch.ops.lorambo.multi_dot)(xs, [torch.ones(3), torch.ones(3)], 1)
    with pytest.raises(RuntimeError, match=r"xs\[1\] is on meta but the other tensors are on cpu"):
        ext_ops.multi_sq_norm(xs)
    with pytest.raises(RuntimeError, match=r"ys\[0\] is on meta but the other tensors are on cpu"):
        cpu_kernel(torch.ops.lorambo.multi_dot)([torch.ones(3)], [torch.empty(3, device="meta")], 1)


def test_backward_through_a_reduction_raises_instead_of_leaving_grad_none():
    gen = generator()
    xs = [torch.randn(3, 5, generator=gen, requires_grad=True), torch.randn(7, generator=gen)]
    ys = [torch.randn(3, 5, generator=gen), torch.randn(7, generator=gen, requires_grad=True)]
    dots = torch.ops.lorambo.multi_dot(xs, ys, 1)
    check_within_accumulation_bound(dots.detach(), [x.detach() for x in xs], [y.detach() for y in ys])
    with pytest.raises(RuntimeError, match=r"derivative for lorambo::multi_dot is not implemented"):
        dots.sum().backward()
    norms = torch.ops.lorambo.multi_sq_norm(xs, 1)
    check_within_accumulation_bound(norms.detach(), [x.detach() for x in xs], [x.detach() for x in xs])
    with pytest.raises(RuntimeError, match=r"derivative for lorambo::multi_sq_norm is not implemented"):
        norms.sum().backward()
    assert xs[0].grad is None and ys[1].grad is None
