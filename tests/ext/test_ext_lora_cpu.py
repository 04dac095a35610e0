"""CPU LoRA backend (lorambo::lora_linear) against the reference op: forward and every gradient."""

import pytest
import torch
from ext_testutil import needs_ext

from lorambo.ops.ext_linear import dropout_mask_ext, lora_linear_ext
from lorambo.ops.lora_linear_ref import lora_linear_reference

pytestmark = needs_ext

NAMES = ("x", "weight", "bias", "lora_A", "lora_B")


def make(m, k, n, cap, dtype, bias=True, grads=NAMES, lead=()):
    x = torch.randn(*lead, m, k, dtype=dtype)
    w = torch.randn(n, k, dtype=dtype) / k**0.5
    b = torch.randn(n, dtype=dtype) if bias else None
    a = torch.randn(cap, k, dtype=dtype) / k**0.5
    bb = torch.randn(n, cap, dtype=dtype)
    out = dict(x=x, weight=w, bias=b, lora_A=a, lora_B=bb)
    for name in grads:
        if out[name] is not None:
            out[name].requires_grad_(True)
    return out


def run(fn, t, rank, scaling, p=0.0, seed=None, grad=None):
    y = fn(t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], rank, scaling, p, seed)
    wanted = [t[k] for k in NAMES if t[k] is not None and t[k].requires_grad]
    grads = torch.autograd.grad(y, wanted, grad) if wanted else ()
    return y, dict(zip([k for k in NAMES if t[k] is not None and t[k].requires_grad], grads))


def cast(t, dtype):
    return {k: (None if v is None else v.detach().to(dtype).requires_grad_(v.requires_grad)) for k, v in t.items()}


@pytest.mark.parametrize("m,rank,bias", [(1, 5, True), (37, 16, False), (1100, 3, True), (300, 0, True), (0, 4, True)])
def test_float64_matches_reference_forward_and_all_gradients(m, rank, bias):
    t = make(m, 48, 80, 16, torch.float64, bias=bias)
    g = torch.randn(m, 80, dtype=torch.float64)
    y, grads = run(lora_linear_ext, t, rank, 0.7, grad=g)
    y_ref, grads_ref = run(lora_linear_reference, t, rank, 0.7, grad=g)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    assert grads.keys() == grads_ref.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-12, atol=1e-12, msg=name)
    assert not grads["lora_A"][rank:].any() and not grads["lora_B"][:, rank:].any()  # exact zeros


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [7, 300, 16384])
def test_low_precision_error_within_twice_the_reference_error(m, dtype):
    """docs/performance.md tolerance rule: error vs float64 <= 2x PyTorch's own error in the same dtype.

    m = 16384 spans 64 row tiles: dA and dB once accumulated across them in bf16/fp16, rounding
    once per tile (4x the reference's error)."""
    t64 = make(m, 96, 64, 32, torch.float64)
    g64 = torch.randn(m, 64, dtype=torch.float64)
    y64, gr64 = run(lora_linear_reference, t64, 20, 0.5, grad=g64)
    t32, g32 = cast(t64, dtype), g64.to(dtype)
    y_ext, gr_ext = run(lora_linear_ext, t32, 20, 0.5, grad=g32)
    y_ref, gr_ref = run(lora_linear_reference, t32, 20, 0.5, grad=g32)
    for name, got, ref, truth in [("y", y_ext, y_ref, y64)] + [(k, gr_ext[k], gr_ref[k], gr64[k]) for k in gr64]:
        err = (got.double() - truth).abs().max()
        ref_err = (ref.double() - truth).abs().max()
        assert err <= 2 * ref_err + 1e-6 * truth.abs().max(), (name, float(err), float(ref_err))


def test_leading_dimensions_and_partial_gradients():
    t = make(6, 32, 24, 8, torch.float64, grads=("lora_B",), lead=(2, 3))
    g = torch.randn(2, 3, 6, 24, dtype=torch.float64)
    y, grads = run(lora_linear_ext, t, 5, 2.0, grad=g)
    y_ref, grads_ref = run(lora_linear_reference, t, 5, 2.0, grad=g)
    assert y.shape == (2, 3, 6, 24) and list(grads) == ["lora_B"]
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grads["lora_B"], grads_ref["lora_B"], rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        assert torch.equal(lora_linear_ext(t["x"], t["weight"], None, t["lora_A"], t["lora_B"], 5, 2.0),
                           torch.ops.lorambo.lora_linear(t["x"].reshape(-1, 32), t["weight"], None, t["lora_A"],
                                                         t["lora_B"], 5, 2.0).reshape(2, 3, 6, 24))


@pytest.mark.parametrize("m", [5, 1100])
def test_dropout_uses_the_philox_mask(m):
    p, seed = 0.25, 1234567
    t = make(m, 40, 30, 8, torch.float64)
    mask = dropout_mask_ext(t["x"], p, seed)
    assert set(mask.unique().tolist()) <= {0.0, 1 / (1 - p)}
    g = torch.randn(m, 30, dtype=torch.float64)
    y, grads = run(lora_linear_ext, t, 6, 1.5, p, seed, grad=g)

    def manual(x, w, b, a, bb, r, s, p_, seed_):  # the reference formula with the extension's mask
        return x @ w.t() + b + s * ((x * mask) @ a[:r].t()) @ bb[:, :r].t()

    y_ref, grads_ref = run(manual, t, 6, 1.5, p, seed, grad=g)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-12, atol=1e-12, msg=name)
    y2, _ = run(lora_linear_ext, t, 6, 1.5, p, seed, grad=g)
    y3, _ = run(lora_linear_ext, t, 6, 1.5, p, seed + 1, grad=g)
    assert torch.equal(y, y2) and not torch.equal(y, y3)


def test_double_backward_for_hessian_vector_products():
    t = make(5, 12, 7, 6, torch.float64, grads=("x", "lora_A", "lora_B"))
    w, b = t["weight"], t["bias"]

    def f(x, a, bb):
        return lora_linear_ext(x, w, b, a, bb, 4, 0.8, 0.3, 99)

    assert torch.autograd.gradcheck(f, (t["x"], t["lora_A"], t["lora_B"]))
    assert torch.autograd.gradgradcheck(f, (t["x"], t["lora_A"], t["lora_B"]))


def test_torch_compile_traces_forward_and_backward():
    t = make(9, 16, 12, 8, torch.float32, grads=("x", "lora_A", "lora_B"))

    def f(x, w, b, a, bb):
        return lora_linear_ext(x, w, b, a, bb, 5, 0.5).square().sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    args = [t[k] for k in NAMES]
    want = torch.autograd.grad(f(*args), [t["x"], t["lora_A"], t["lora_B"]])
    got = torch.autograd.grad(compiled(*args), [t["x"], t["lora_A"], t["lora_B"]])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_opcheck():
    t = make(6, 8, 5, 4, torch.float64)
    args = (t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], 3, 0.5)
    for p in (0.0, 0.25):
        torch.library.opcheck(torch.ops.lorambo.lora_linear.default, (*args, p, 7))
        plain = tuple(a.detach() if torch.is_tensor(a) else a for a in args)
        torch.library.opcheck(torch.ops.lorambo.lora_linear_fwd.default, (*plain, p, 7))
        y, tt = torch.ops.lorambo.lora_linear_fwd(*plain, p, 7)
        g = torch.randn_like(y)
        for mask in ([True, False, True, True, True], [False, True, False, False, True]):
            torch.library.opcheck(torch.ops.lorambo.lora_linear_bwd.default,
                                  (g, plain[0], plain[1], plain[3], plain[4], tt, 3, 0.5, p, 7, mask))


# ------------------------------------------------------------------------------- bad input
def test_bad_shapes_dtypes_and_arguments():
    t = make(4, 8, 6, 4, torch.float32, grads=())
    x, w, b, a, bb = (t[k] for k in NAMES)
    op = torch.ops.lorambo.lora_linear
    # a K mismatch names x and both shapes (it blamed the weight: "weight must be [N, K] with K = 7")
    with pytest.raises(RuntimeError, match=r"x has last dim 7 \(shape \[4, 7\]\) but weight is \[6, 8\] = \[N, K\]"):
        op(torch.randn(4, 7), w, b, a, bb, 2, 1.0)
    with pytest.raises(RuntimeError, match=r"x has last dim 8 \(shape \[4, 8\]\) but weight is \[6, 9\] = \[N, K\]"):
        op(x, torch.randn(6, 9), b, a, bb, 2, 1.0)
    with pytest.raises(RuntimeError, match=r"weight must be 2-D \[N, K\], got shape \[6, 8, 1\]"):
        op(x, torch.randn(6, 8, 1), b, a, bb, 2, 1.0)
    with pytest.raises(RuntimeError, match=r"lora_B must be \[N, capacity\] = \[6, 4\], got shape \[6, 5\]"):
        op(x, w, b, a, torch.randn(6, 5), 2, 1.0)
    with pytest.raises(RuntimeError, match=r"rank 5 is outside \[0, capacity = 4\]"):
        op(x, w, b, a, bb, 5, 1.0)
    with pytest.raises(RuntimeError, match=r"bias must be \[N\] = \[6\], got shape \[7\]"):
        op(x, w, torch.randn(7), a, bb, 2, 1.0)
    with pytest.raises(RuntimeError, match=r"lora_A has dtype Double but x has dtype Float"):
        op(x, w, b, a.double(), bb, 2, 1.0)
    with pytest.raises(RuntimeError, match=r"x has dtype Int"):
        op(x.int(), w.int(), b.int(), a.int(), bb.int(), 2, 1.0)
    with pytest.raises(RuntimeError, match=r"dropout_p must be in \[0, 1\), got 1"):
        op(x, w, b, a, bb, 2, 1.0, 1.0, 3)
    with pytest.raises(RuntimeError, match=r"seed must be in \[0, 2\^63\), got -4"):
        op(x, w, b, a, bb, 2, 1.0, 0.5, -4)
    with pytest.raises(RuntimeError, match=r"x must be 2-D \[M, K\], got shape \[2, 2, 8\]"):
        op(x.view(2, 2, 8), w, b, a, bb, 2, 1.0)
    with pytest.raises(ValueError, match="needs an integer seed"):
        lora_linear_ext(x, w, b, a, bb, 2, 1.0, 0.5)


def test_dropout_mask_takes_a_layer_input_of_any_rank_and_refuses_a_0d_tensor():
    # its callers pass x2 [M, K] (the kernels) or x [..., K] (dropout_mask_ext): position = flat index
    x = torch.randn(2, 3, 5)
    assert torch.equal(dropout_mask_ext(x, 0.5, 9).reshape(6, 5), dropout_mask_ext(x.reshape(6, 5), 0.5, 9))
    assert torch.equal(dropout_mask_ext(x[0, 0], 0.5, 9), dropout_mask_ext(x.reshape(-1), 0.5, 9)[:5])
    with pytest.raises(RuntimeError, match=r"^lorambo::dropout_mask: x must have at least one dimension \[\.\.\., K\], "
                                           r"got a 0-d tensor"):
        torch.ops.lorambo.dropout_mask(torch.tensor(0.5), 0.25, 9)


# ------------------------------------------------------------------ several threads, many tiles
def exact_lora64(x, w, b, a, bb, rank, scaling, mask, g):
    """y and every gradient in float64 from the formula with plain autograd, on exact copies of
    the operands, and the same with every operand replaced by its absolute value (the scale of
    each rounding error)."""
    out = []
    for fn, s in ((lambda v: v, scaling), (torch.abs, abs(scaling))):
        ops = [fn(v.detach().double()).requires_grad_(True) for v in (x, w, b, a, bb)]
        x64, w64, b64, a64, bb64 = ops
        y = x64 @ w64.t() + b64 + s * ((x64 * mask) @ a64[:rank].t()) @ bb64[:, :rank].t()
        out.append((y.detach(), torch.autograd.grad(y, ops, fn(g.double()))))
    return out


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_several_threads_and_row_tiles_match_float64(dtype, p):
    """M = 1001 over 3 threads: 3 row blocks of 333-334 rows, each walked in 2 tiles of at most 256
    rows, so dA and dB are summed across tiles and across the blocks' partials (float32 partials
    for bfloat16); with an odd K the tiles and blocks start at rows whose flat position is not a
    multiple of 4, the Philox word group's width. Every element of y and of each gradient.

    Positive operands: sums without cancellation, so a block's lost or doubled partial (a third of
    the rows) stands far above the bfloat16 rounding bound (a negative scaling keeps signs tested)."""
    m, k, n, cap, rank, scaling, seed = 1001, 37, 29, 7, 5, -0.6, 4242
    t = {name: v.detach().abs().add_(0.1).requires_grad_(True) for name, v in make(m, k, n, cap, dtype).items()}
    g = (torch.rand(m, n, dtype=torch.float64) + 0.1).to(dtype)
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        y, grads = run(lora_linear_ext, t, rank, scaling, p, seed, grad=g)
    finally:
        torch.set_num_threads(before)
    mask = dropout_mask_ext(t["x"].detach().double(), p, seed) if p else torch.ones(m, k, dtype=torch.float64)
    (y64, grads64), (y_abs, grads_abs) = exact_lora64(*(t[name] for name in NAMES), rank, scaling, mask, g)
    # float64: a few roundings of each term; bfloat16: the products' inputs and outputs rounded to bf16
    eps = 1e-14 if dtype == torch.float64 else 8 * 2.0 ** -8
    checks = [("y", y, y64, y_abs)] + [(name, grads[name], want, scale)
                                       for name, want, scale in zip(NAMES, grads64, grads_abs)]
    for name, got, want, scale in checks:
        err = (got.double() - want).abs()
        assert bool((err <= eps * scale + 1e-300).all()), (name, float((err - eps * scale).max()))
    assert not grads["lora_A"][rank:].any() and not grads["lora_B"][:, rank:].any()  # exact zeros


def test_backward_op_names_a_mis_shaped_or_mistyped_grad_y_and_t():
    m, k, n, cap, rank = 5, 7, 6, 4, 3
    t = make(m, k, n, cap, torch.float64, grads=())
    x, w, a, bb = t["x"], t["weight"], t["lora_A"], t["lora_B"]
    y, t_ok = torch.ops.lorambo.lora_linear_fwd(x, w, None, a, bb, rank, 0.5, 0.0, 0)
    g_ok = torch.randn_like(y)
    f64 = torch.float64
    cases = [(torch.randn(m + 1, n, dtype=f64), t_ok, r"grad_y must be \[M, N\] = \[5, 6\], got shape \[6, 6\]"),
             (torch.randn(m, n + 1, dtype=f64), t_ok, r"grad_y must be \[M, N\] = \[5, 6\], got shape \[5, 7\]"),
             (g_ok.float(), t_ok, r"grad_y has dtype Float but x has dtype Double"),
             (g_ok, torch.randn(m, cap, dtype=f64), r"t must be \[M, rank\] = \[5, 3\], got shape \[5, 4\]"),
             (g_ok, torch.randn(m + 1, rank, dtype=f64), r"t must be \[M, rank\] = \[5, 3\], got shape \[6, 3\]"),
             (g_ok, t_ok.float(), r"t has dtype Float but x has dtype Double")]
    for grad_y, t_arg, message in cases:
        with pytest.raises(RuntimeError, match=r"^lorambo::lora_linear_bwd: " + message):
            torch.ops.lorambo.lora_linear_bwd(grad_y, x, w, a, bb, t_arg, rank, 0.5, 0.0, 0, [True] * 5)


@pytest.mark.parametrize("p", [1 - 2.0**-33, 1 - 2.0**-45])
def test_a_dropout_p_within_2_to_the_minus_32_of_one_drops_every_element(p):
    """The keep threshold ceil(p 2^32) is then 2^32, above every 32-bit Philox word: nothing is
    kept, in the mask and in the LoRA kernels (a 32-bit compare against the threshold's low word,
    0, kept every element, scaled by 1/(1-p) >= 2^33). y is then the base layer's output."""
    t = make(37, 29, 11, 6, torch.float64, grads=())
    mask = dropout_mask_ext(t["x"], p, 77)
    assert mask.shape == t["x"].shape and not mask.any()
    y = lora_linear_ext(t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], 4, 1.5, p, 77)
    base = t["x"].double() @ t["weight"].double().t() + t["bias"].double()
    torch.testing.assert_close(y, base, rtol=1e-12, atol=1e-12)
