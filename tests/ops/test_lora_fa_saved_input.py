"""LoRA-FA (base weight and lora_A frozen, lora_B trained): the backward keeps no copy of x.

Its backward needs only t = drop(x) A_r^T [M, r], which the forward saves anyway, not x [M, K]
(lorambo.ops.custom_op.keeps_input). On every backend that runs on CPU, eagerly, through the
custom ops (the path of TorchDispatchModes, here FlopCounterMode) and under torch.compile:

- the bytes autograd saves are those of t and scalars, not x's, and still x's for a layer
  whose lora_A trains;
- gradients (x, lora_B) equal a float64 plain-torch reference with the backend's own dropout mask;
- Hessian-vector products (create_graph=True) through two stacked LoRA-FA layers, w.r.t. both
  lora_B and x, equal the float64 reference: the cross terms between the second layer's lora_B
  and everything upstream of its input flow through t, which stands in for x there.
"""

import contextlib

import pytest
import torch

import lorambo
from lorambo.nn.lora_linear import LoRAMBoLinear
from lorambo.ops.custom_op import seed_tensor
from lorambo.sensitivity.hvp import HessianOperator

from cpu_backends import BACKENDS, op_for
from saved_bytes import layer_operands, op_runner, saved_bytes

M, K, N, CAPACITY, RANK, SCALING = 48, 32, 20, 6, 4, 1.5

# eager: the backends' autograd Functions (the extension's in C++); custom_op: the torch.library
# ops; compiled: torch.compile(fullgraph=True) over the custom ops
PATHS = ["eager", "custom_op", "compiled"]


def _mask(backend, x2, p, seed):
    """The dropout multiplier the backend applies to the rows x2 [M, K] (its own generator)."""
    if backend == "torch":
        from lorambo.ops.lora_linear_ref import dropout_mask

        return dropout_mask(x2, p, seed)
    if backend == "ext":
        from lorambo.ops.ext_linear import dropout_mask_ext

        return dropout_mask_ext(x2, p, seed)
    import lorambo.ops.triton_linear  # noqa: F401  (registers torch.ops.lorambo_triton)

    return torch.ops.lorambo_triton.dropout_multiplier(x2, p, seed_tensor(seed))


def _layer(seed, train_a=False, in_features=K):
    """weight, bias (frozen), lora_A (frozen unless ``train_a``), lora_B (trained), float32."""
    return layer_operands(seed, N, in_features, CAPACITY, train_a, True)


def _runner(backend, path, p, seed):
    """f(x, weight, bias, lora_A, lora_B) -> y on ``path``, and the context to call it in."""
    return op_runner(op_for(backend), path, RANK, SCALING, p, seed)


def _saved_bytes(run, context, x, params) -> int:
    """Bytes of the distinct non-parameter storages the forward saves for backward."""
    return saved_bytes(lambda: run(x, *params), params, context)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("train_a", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_lora_fa_layer_saves_t_not_x(backend, path, train_a, dropout):
    params = _layer(1, train_a)
    x = torch.randn(M, K, requires_grad=True)
    run, context = _runner(backend, path, dropout, seed=7)
    saved = _saved_bytes(run, context, x, params)
    x_bytes, t_bytes = M * K * 4, M * RANK * 4
    if train_a:  # dA_r = s t'^T drop(x) reads x: the layer keeps it
        assert saved >= x_bytes
    else:  # t, and 0-d tensors (the seed, the one-element stand-in of x)
        assert saved <= t_bytes + 64


def _reference(x, weight, bias, lora_A, lora_B, mask):
    """The layer in float64 plain torch (autograd's own derivatives), with the given mask."""
    d = lambda t: t.double()  # noqa: E731
    x_drop = x * d(mask) if mask is not None else x
    t = x_drop @ d(lora_A)[:RANK].t()
    return x @ d(weight).t() + d(bias) + SCALING * t @ lora_B[:, :RANK].t()


def _assert_close(actual, expected):
    """A float32 result against its float64 reference, at every element (float32 rounding
    relative to the tensor's largest element: second derivatives sum many products)."""
    torch.testing.assert_close(actual.double(), expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_lora_fa_gradients_match_float64_reference(backend, path, dropout):
    weight, bias, lora_A, lora_B = _layer(2)
    x = torch.randn(M, K, requires_grad=True)
    grad_y = torch.randn(M, N)
    run, context = _runner(backend, path, dropout, seed=9)
    with context():
        y = run(x, weight, bias, lora_A, lora_B)
        grad_x, grad_b = torch.autograd.grad(y, (x, lora_B), grad_y)
    mask = _mask(backend, x.detach(), dropout, 9) if dropout > 0 else None
    x64, b64 = x.detach().double().requires_grad_(), lora_B.detach().double().requires_grad_()
    y64 = _reference(x64, weight, bias, lora_A, b64, mask)
    want_x, want_b = torch.autograd.grad(y64, (x64, b64), grad_y.double())
    _assert_close(y, y64.detach())
    _assert_close(grad_x, want_x)
    _assert_close(grad_b, want_b)
    assert torch.equal(grad_b[:, RANK:], torch.zeros(N, CAPACITY - RANK))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("path", ["eager", "custom_op"])  # AOTAutograd compiles no double backward
@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_hessian_vector_product_through_two_lora_fa_layers_matches_float64_reference(backend, path, dropout):
    # d/d(B1, B2, x) of <dL/d(B1, B2), v>: dL/dB2 = s dY2^T t2 depends on B1 and x through t2,
    # the second layer's t = drop(h) A2^T, its input h not kept
    first, second = _layer(3), _layer(4, in_features=N)
    x = torch.randn(M, K, requires_grad=True)
    gen = torch.Generator().manual_seed(5)
    vs = [torch.randn(N, CAPACITY, generator=gen) for _ in range(2)]
    run1, context = _runner(backend, path, dropout, seed=11)
    run2, _ = _runner(backend, path, dropout, seed=12)
    with context():
        h = run1(x, *first)
        loss = run2(h, *second).tanh().square().sum()
        grads = torch.autograd.grad(loss, (first[3], second[3]), create_graph=True)
        hvp = torch.autograd.grad(sum((g * v).sum() for g, v in zip(grads, vs)), (first[3], second[3], x))
    masks = [_mask(backend, t.detach(), dropout, seed) if dropout > 0 else None for t, seed in ((x, 11), (h, 12))]
    x64 = x.detach().double().requires_grad_()
    b1, b2 = (p[3].detach().double().requires_grad_() for p in (first, second))
    h64 = _reference(x64, *first[:3], b1, masks[0])
    loss64 = _reference(h64, *second[:3], b2, masks[1]).tanh().square().sum()
    grads64 = torch.autograd.grad(loss64, (b1, b2), create_graph=True)
    hvp64 = torch.autograd.grad(sum((g * v.double()).sum() for g, v in zip(grads64, vs)), (b1, b2, x64))
    for got, want in zip(grads, grads64):
        _assert_close(got.detach(), want.detach())
    for got, want in zip(hvp, hvp64):
        _assert_close(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batched", [False, True])
def test_hessian_operator_on_a_lora_fa_model_matches_float64_reference(backend, batched):
    # lorambo's own Hessian-vector products (batched: vmap over the double backward, which then
    # carries batched gradients of t) on LoRAMBoLinear layers whose lora_A is frozen
    lorambo.set_backend(backend)
    torch.manual_seed(6)
    layers = [LoRAMBoLinear(torch.nn.Linear(k, N), rank=RANK, capacity=CAPACITY, scaling=SCALING) for k in (K, N)]
    model = torch.nn.Sequential(layers[0], torch.nn.Tanh(), layers[1])
    for layer in (model[0], model[2]):
        layer.lora_A.requires_grad_(False)
        with torch.no_grad():
            layer.lora_B.normal_(0.0, 0.3)
    x = torch.randn(M, K)
    weights = [model[0].lora_B, model[2].lora_B]
    operator = HessianOperator(model, lambda m, batch: m(batch).square().mean(), [x], weights, batched=batched)
    vs = [torch.randn(3, *w.shape) for w in weights]
    # the Triton kernels (in the plain second backward) cannot read vmap's batched tensors: there
    # HessianOperator warns and loops over the probes, as documented; elsewhere vmap must run
    loops = batched and backend == "triton"
    with pytest.warns(RuntimeWarning, match="falling back") if loops else contextlib.nullcontext():
        products = operator.apply(vs, lambda hvs: hvs)
    assert operator.batched == (batched and not loops)

    def loss64(b1, b2):
        params = [(model[i].base_layer, model[i].lora_A) for i in (0, 2)]
        h = _reference(x.double(), params[0][0].weight, params[0][0].bias, params[0][1], b1, None).tanh()
        return _reference(h, params[1][0].weight, params[1][0].bias, params[1][1], b2, None).square().mean()

    b64 = [w.detach().double().requires_grad_() for w in weights]
    grads64 = torch.autograd.grad(loss64(*b64), b64, create_graph=True)
    for probe in range(3):
        want = torch.autograd.grad(grads64, b64, [v[probe].double() for v in vs], retain_graph=True)
        for got, expected in zip(products, want):
            _assert_close(got[probe], expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_backward_op_reads_only_the_shape_of_a_stand_in_x(backend, dropout):
    # What the autograd passes for a LoRA-FA layer's x (and here for weight and lora_A too, which
    # dB and db do not read either): zero-stride stand-ins. In = 2^40 makes any copy of them
    # (contiguous(), a materialised mask product) a 16 TiB allocation that fails.
    op_for(backend)  # registers the backend's ops
    ops = getattr(torch.ops, {"torch": "lorambo_ref", "ext": "lorambo_ext", "triton": "lorambo_triton"}[backend])
    wide = 2**40
    x, weight, lora_A = (torch.zeros(()).expand(rows, wide) for rows in (M, N, CAPACITY))
    lora_B = torch.randn(N, CAPACITY)
    grad_y, t = torch.randn(M, N), torch.randn(M, RANK)
    out = ops.lora_linear_bwd(grad_y, x, weight, lora_A, lora_B, t, RANK, SCALING, dropout, seed_tensor(3),
                              False, False, True, False, True)
    grad_b, grad_bb = out[2], out[4]
    _assert_close(grad_b, grad_y.double().sum(0))
    _assert_close(grad_bb[:, :RANK], SCALING * grad_y.double().t() @ t.double())
    assert torch.equal(grad_bb[:, RANK:], torch.zeros(N, CAPACITY - RANK))
