"""The fake implementations of the backends' registered LoRA ops (what FakeTensorMode and
torch.compile trace with) refuse what the ops refuse, with the op's own message, so a bad call
fails while it is traced, not when the compiled graph runs; they still take the good calls,
whose compiled results equal plain float64 torch."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import lorambo.ops.lora_linear_ref  # noqa: F401  registers torch.ops.lorambo_ref
import lorambo.ops.triton_linear  # noqa: F401  registers torch.ops.lorambo_triton
from lorambo.ext import loader as ext_loader

M, K, N, CAP, RANK = 4, 6, 5, 3, 2
NAMESPACES = ["lorambo_ref", "lorambo_triton",
              pytest.param("lorambo_ext", marks=pytest.mark.skipif(ext_loader.load() is None,
                                                                   reason="compiled extension not built"))]
if ext_loader.load() is not None:
    import lorambo.ops.ext_linear  # noqa: F401  registers torch.ops.lorambo_ext


def operands(dtype=torch.float32, **swap):
    gen = torch.Generator().manual_seed(5)
    shapes = dict(x=(M, K), weight=(N, K), bias=(N,), lora_A=(CAP, K), lora_B=(N, CAP), grad_y=(M, N),
                  t=(M, RANK))
    shapes.update(swap)
    return {name: torch.randn(s, generator=gen, dtype=dtype) for name, s in shapes.items()}


def fwd(ops, o, rank=RANK, scaling=0.5, p=0.0, seed=torch.tensor(3)):
    return ops.lora_linear_fwd(o["x"], o["weight"], o["bias"], o["lora_A"], o["lora_B"], rank, scaling, p, seed)


def bwd(ops, o, rank=RANK, scaling=0.5, p=0.0, seed=torch.tensor(3)):
    return ops.lora_linear_bwd(o["grad_y"], o["x"], o["weight"], o["lora_A"], o["lora_B"], o["t"], rank, scaling,
                               p, seed, True, True, True, True, True)


def multiplier(ops, o, p=0.5, seed=torch.tensor(3), **_):
    return ops.dropout_multiplier(o["x"], p, seed)


def _mixed_dtypes():
    o = operands()
    o["lora_A"] = o["lora_A"].double()
    return o


# (op, operands, scalars): calls every backend's op refuses
BAD_CALLS = {
    "fwd wrong K": (fwd, lambda: operands(x=(M, K + 1)), {}),
    "bwd wrong K": (bwd, lambda: operands(x=(M, K + 1)), {}),
    "fwd rank > capacity": (fwd, operands, dict(rank=CAP + 1)),
    "bwd rank > capacity": (bwd, lambda: operands(t=(M, CAP + 1)), dict(rank=CAP + 1)),
    "fwd mixed dtypes": (fwd, _mixed_dtypes, {}),
    "bwd grad_y shape": (bwd, lambda: operands(grad_y=(M, N + 1)), {}),
    "fwd dropout_p = 1": (fwd, operands, dict(p=1.0)),
    "bwd dropout_p < 0": (bwd, operands, dict(p=-0.25)),
    "multiplier dropout_p = 1": (multiplier, operands, dict(p=1.0)),
    "fwd float seed": (fwd, operands, dict(p=0.5, seed=torch.tensor(3.5))),
    "multiplier 1-d seed": (multiplier, operands, dict(seed=torch.tensor([3]))),
}


def eager_error(call, ops, o, scalars):
    with pytest.raises((ValueError, TypeError, RuntimeError)) as err:
        call(ops, o, **scalars)
    return type(err.value), str(err.value)


@pytest.mark.parametrize("ns", NAMESPACES)
@pytest.mark.parametrize("case", BAD_CALLS)
def test_the_fake_refuses_a_bad_call_with_the_ops_message(ns, case):
    ops = getattr(torch.ops, ns)
    call, make, scalars = BAD_CALLS[case]
    error, message = eager_error(call, ops, make(), scalars)
    with FakeTensorMode() as mode:
        o = {name: mode.from_tensor(t) for name, t in make().items()}
        fake_scalars = {"seed": torch.tensor(3), **scalars}
        fake_scalars = {k: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in fake_scalars.items()}
        with pytest.raises(error) as err:
            call(ops, o, **fake_scalars)
    assert str(err.value) == message
    meta = {name: t.to("meta") for name, t in make().items()}  # meta tensors take the fake too
    with pytest.raises(error) as err:
        call(ops, meta, **scalars)
    assert str(err.value) == message


@pytest.mark.parametrize("ns", NAMESPACES)
@pytest.mark.parametrize("case", ["fwd wrong K", "fwd rank > capacity", "fwd mixed dtypes", "fwd dropout_p = 1"])
def test_compile_refuses_a_bad_call_while_tracing(ns, case):
    """Dynamo wraps what a fake raises in a TorchRuntimeError naming it; the op itself, run by the
    compiled graph, would raise its own error unwrapped."""
    ops = getattr(torch.ops, ns)
    call, make, scalars = BAD_CALLS[case]
    error, message = eager_error(call, ops, make(), scalars)
    compiled = torch.compile(lambda o: call(ops, o, **scalars), fullgraph=True, backend="aot_eager")
    torch._dynamo.reset()
    with pytest.raises(torch._dynamo.exc.TorchRuntimeError) as err:
        compiled(make())
    assert f"got {error.__name__}({message!r})" in str(err.value)


def test_the_fake_refuses_a_dtype_the_backend_does_not_compute_in():
    for ns, dtype in (("lorambo_ref", torch.int64), ("lorambo_triton", torch.float64)):
        ops = getattr(torch.ops, ns)
        o = {name: t.to(dtype) for name, t in operands().items()}
        error, message = eager_error(fwd, ops, o, {})
        with FakeTensorMode() as mode, pytest.raises(error) as err:
            fwd(ops, {name: mode.from_tensor(t) for name, t in o.items()}, seed=mode.from_tensor(torch.tensor(3)))
        assert str(err.value) == message


@pytest.mark.parametrize("ns", NAMESPACES)
def test_good_calls_on_meta_tensors_give_the_shapes(ns):
    """Meta tensors (shape inference) run on no device: the backend's device check is not theirs."""
    ops = getattr(torch.ops, ns)
    o = {name: t.to("meta") for name, t in operands().items()}
    y, t = fwd(ops, o, p=0.5)
    assert y.is_meta and (y.shape, t.shape) == ((M, N), (M, RANK))
    assert [tuple(g.shape) for g in bwd(ops, o, p=0.5)] == [(M, K), (N, K), (N,), (CAP, K), (N, CAP)]
    assert multiplier(ops, o).shape == (M, K)


def _plain_float64(o, rank, scaling, mask):
    x, a, b = o["x"].double(), o["lora_A"].double()[:rank], o["lora_B"].double()[:, :rank]
    return x @ o["weight"].double().t() + o["bias"].double() + scaling * ((x * mask) @ a.t()) @ b.t()


@pytest.mark.parametrize("ns", [n for n in NAMESPACES if n != "lorambo_triton"])
@pytest.mark.parametrize("rank, p", [(0, 0.0), (RANK, 0.0), (CAP, 0.4)])
def test_good_calls_still_compile_and_match_plain_float64_torch(ns, rank, p):
    ops = getattr(torch.ops, ns)
    o = operands(dtype=torch.float64)
    seed = torch.tensor(9)
    o["t"] = torch.randn(M, rank, dtype=torch.float64, generator=torch.Generator().manual_seed(6))

    def both(o, seed):
        return fwd(ops, o, rank=rank, p=p, seed=seed), bwd(ops, o, rank=rank, p=p, seed=seed)

    compiled = torch.compile(both, fullgraph=True, backend="aot_eager")
    torch._dynamo.reset()
    (y, t), grads = compiled(o, seed)
    mask = ops.dropout_multiplier(o["x"], p, seed) if p > 0 else torch.ones_like(o["x"])
    assert p == 0 or (mask == 0).any()
    torch.testing.assert_close(y, _plain_float64(o, rank, 0.5, mask))
    torch.testing.assert_close(t, (o["x"] * mask) @ o["lora_A"][:rank].t())
    g, w, a, b = o["grad_y"], o["weight"], o["lora_A"][:rank], o["lora_B"][:, :rank]
    grad_x = g @ w + 0.5 * ((g @ b) @ a) * mask
    grad_a = torch.zeros(CAP, K, dtype=torch.float64)
    grad_a[:rank] = 0.5 * (g @ b).t() @ (o["x"] * mask)
    grad_b = torch.zeros(N, CAP, dtype=torch.float64)
    grad_b[:, :rank] = 0.5 * g.t() @ o["t"]
    for got, want in zip(grads, (grad_x, g.t() @ o["x"], g.sum(0), grad_a, grad_b)):
        torch.testing.assert_close(got, want)
