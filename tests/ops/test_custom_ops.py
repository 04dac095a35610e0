"""The per-backend custom ops (lorambo.ops.custom_op) of the reference and the extension:
opcheck, exact double backward through the registered autograd, and torch.compile with dropout.

(The Triton backend's ops are checked the same way in tests/kernels/test_kernel_torch_library.py.)
"""

import os

import pytest
import torch

import lorambo
from lorambo.ext import loader as ext_loader
from lorambo.ops import lora_linear
from lorambo.ops.custom_op import seed_tensor
from lorambo.ops.ext_linear import lora_linear_ext
from lorambo.ops.lora_linear_ref import lora_linear_reference

if ext_loader.load() is None and os.environ.get("LORAMBO_REQUIRE_EXT") == "1":
    raise RuntimeError("LORAMBO_REQUIRE_EXT=1 but lorambo._C is not available")

PUBLIC = {"lorambo_ref": lora_linear_reference, "lorambo_ext": lora_linear_ext}
BACKEND = {"lorambo_ref": "torch", "lorambo_ext": "ext"}


@pytest.fixture(params=list(PUBLIC))
def ns(request):
    if request.param == "lorambo_ext" and ext_loader.load() is None:
        pytest.skip("compiled extension not built (CI builds it and sets LORAMBO_REQUIRE_EXT=1)")
    return request.param


def inputs(m=6, k=9, n=7, cap=5, dtype=torch.float64):
    t = [torch.randn(s, dtype=dtype) for s in ((m, k), (n, k), (n,), (cap, k), (n, cap))]
    return [v.requires_grad_(i != 1) for i, v in enumerate(t)]  # the base weight frozen


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("rank", [0, 3])
def test_opcheck(ns, p, rank):
    """Real and fake implementations agree (shapes, dtypes, strides), rank 0's empty t [M, 0] included."""
    ops = getattr(torch.ops, ns)
    x, w, b, a, bb = inputs()
    seed = seed_tensor(17)
    torch.library.opcheck(ops.lora_linear_fwd.default, (x, w, b, a, bb, rank, 0.7, p, seed))
    with torch.no_grad():
        _, t = ops.lora_linear_fwd(x, w, b, a, bb, rank, 0.7, p, seed)
    gy = torch.randn(6, 7, dtype=torch.float64)
    torch.library.opcheck(ops.lora_linear_bwd.default,
                          (gy, x.detach(), w, a.detach(), bb.detach(), t, rank, 0.7, p, seed, True, False, True, True, True),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(ops.dropout_multiplier.default, (x.detach(), 0.3, seed))


def test_double_backward_of_the_custom_op_is_exact(ns):
    """create_graph=True through the registered autograd (the path torch.compile'd graphs and
    direct op calls take), with dropout: gradgradcheck against finite differences."""
    ops = getattr(torch.ops, ns)
    x, w, b, a, bb = inputs(3, 4, 3, 3)
    w.requires_grad_(True)
    seed = seed_tensor(5)

    def f(x, w, b, a, bb):
        return ops.lora_linear_fwd(x, w, b, a, bb, 2, 0.7, 0.4, seed)[0]

    assert torch.autograd.gradcheck(f, (x, w, b, a, bb))
    assert torch.autograd.gradgradcheck(f, (x, w, b, a, bb))


def test_compiled_op_with_dropout_matches_eager_same_seed_same_mask(ns):
    torch._dynamo.reset()
    op = PUBLIC[ns]
    x, w, b, a, bb = inputs(dtype=torch.float32)

    def f(x, a, bb, seed):
        return op(x, w, b, a, bb, 4, 1.3, 0.5, seed)

    def with_grads(fn, seed):
        y = fn(x, a, bb, seed)
        return (y,) + torch.autograd.grad(y.square().sum(), (x, a, bb))  # the mask regenerated in backward

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")  # a graph break raises
    for seed in (3, 4):  # the seed is a graph input: one graph, a different mask per seed
        got, want = with_grads(compiled, seed_tensor(seed)), with_grads(f, seed)
        for g, e in zip(got, want):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(compiled(x, a, bb, seed_tensor(3)), compiled(x, a, bb, seed_tensor(4)))


def test_compiled_dispatch_draws_a_fresh_seed_per_call(ns):
    torch._dynamo.reset()
    lorambo.set_backend(BACKEND[ns])
    x, w, b, a, bb = (t.detach().float() for t in inputs())

    def f(x):
        return lora_linear(x, w, b, a, bb, 4, 1.3, 0.5)  # seed None: drawn in the graph

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    first, second = compiled(x), compiled(x)
    assert not torch.equal(first, second)
    torch.manual_seed(9)
    got = compiled(x)
    torch.manual_seed(9)
    torch.testing.assert_close(got, f(x), rtol=1e-5, atol=1e-6)
