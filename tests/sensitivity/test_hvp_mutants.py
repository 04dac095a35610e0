"""HessianOperator (lorambo.sensitivity.hvp) against an explicit joint Hessian of a tiny float64 model.

Written from mutation testing of lorambo/sensitivity/hvp.py: every product is compared with H @ v from
torch.autograd.functional.hessian over all measured weights at once (the cross-layer blocks included).
"""

import gc
import types
import warnings
import weakref

import pytest
import torch
from torch import nn

from lorambo.sensitivity import hvp
from lorambo.sensitivity.hvp import HessianOperator
from lorambo.sensitivity.inputs import NonFiniteProducts

DT = torch.float64


class Net(nn.Module):
    """Linear -> tanh -> Linear, plus a layer the loss never calls."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 4, dtype=DT)
        self.b = nn.Linear(4, 2, dtype=DT)
        self.unused = nn.Linear(2, 2, dtype=DT)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def mse(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def make(seed, n_batches=3):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = Net()
    batches = [(torch.randn(5, 3, generator=gen, dtype=DT), torch.randn(5, 2, generator=gen, dtype=DT))
               for _ in range(n_batches)]
    return model, batches


def joint_hessian(model, loss_fn, batches, names):
    """Dense Hessian of the mean loss over ``batches`` w.r.t. the named parameters, flattened and
    concatenated in that order: [sum numel, sum numel]."""
    params = dict(model.named_parameters())
    shapes = [params[n].shape for n in names]
    sizes = [params[n].numel() for n in names]

    def f(flat):
        chunks = torch.split(flat, sizes)
        replaced = {n: c.view(s) for n, c, s in zip(names, chunks, shapes)}
        return sum(loss_fn(_Bound(model, replaced), b) for b in batches) / len(batches)

    flat = torch.cat([params[n].detach().reshape(-1) for n in names]).clone()
    return torch.autograd.functional.hessian(f, flat)


class _Bound:
    """Calls ``model`` with some parameters replaced (torch.func.functional_call)."""

    def __init__(self, model, replaced):
        self.model, self.replaced = model, replaced

    def __call__(self, x):
        return torch.func.functional_call(self.model, self.replaced, (x,))


def probes(shapes, num, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(num, *s, generator=gen, dtype=DT) for s in shapes]


def reference_products(hessian, vs):
    """H @ v for each probe, split back into per-weight blocks [P, *shape]."""
    num = vs[0].shape[0]
    flat = torch.cat([v.reshape(num, -1) for v in vs], dim=1)   # (P, n)
    hv = flat @ hessian.T
    out, start = [], 0
    for v in vs:
        size = v[0].numel()
        out.append(hv[:, start:start + size].reshape(v.shape))
        start += size
    return out


@pytest.mark.parametrize("batched,num", [(True, 3), (False, 3), (True, 1), (None, 2)])
def test_products_match_the_joint_dense_hessian(batched, num):
    """apply() returns (H v)_i for every measured weight and probe, H the Hessian of the mean loss over
    the batches with its cross-layer blocks, for the vmapped and the looped double backward alike."""
    model, batches = make(seed=11)
    names = ["a.weight", "b.weight", "a.bias"]
    params = dict(model.named_parameters())
    weights = [params[n] for n in names]
    op = HessianOperator(model, mse, batches, weights, batched=batched, names=names)
    vs = probes([w.shape for w in weights], num, seed=12)
    got = op.apply(vs, summarize=lambda products: products)
    want = reference_products(joint_hessian(model, mse, batches, names), vs)
    assert len(got) == len(weights)
    for g, w, v in zip(got, want, vs):
        assert g.shape == v.shape and g.dtype == DT
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)
        assert g.abs().max() > 1e-3  # the blocks are not trivially zero


@pytest.mark.parametrize("batched", [True, False])
def test_summary_is_averaged_over_batches_and_zero_for_an_unreached_weight(batched):
    """A summary (here per-layer quadratic forms v.Hv) is taken per batch and averaged; a weight that
    the loss never reaches gives an all-zero block while the others are still measured."""
    model, batches = make(seed=13, n_batches=2)
    names = ["a.weight", "unused.weight", "b.weight"]
    params = dict(model.named_parameters())
    weights = [params[n] for n in names]
    op = HessianOperator(model, mse, batches, weights, batched=batched, names=names)
    vs = probes([w.shape for w in weights], 4, seed=14)

    def quadratic_forms(products):
        return [(p * v).flatten(1).sum(1) for p, v in zip(products, vs)]

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback from vmap, no constant-gradient warning
        got = op.apply(vs, summarize=quadratic_forms)
    reached = ["a.weight", "b.weight"]
    hv = reference_products(joint_hessian(model, mse, batches, reached), [vs[0], vs[2]])
    want = [(hv[0] * vs[0]).flatten(1).sum(1), torch.zeros(4, dtype=DT), (hv[1] * vs[2]).flatten(1).sum(1)]
    for g, w in zip(got, want):
        assert g.shape == (4,)
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)
    assert bool((got[0] != 0).all()) and bool((got[2] != 0).all())


def test_no_gradient_for_any_weight_is_an_error_naming_the_weights():
    """A loss with a graph that reaches none of the measured weights raises RuntimeError naming the
    estimator and the weights, instead of a silent zero Hessian."""
    model, batches = make(seed=15)
    op = HessianOperator(model, mse, batches, [model.unused.weight], names=["unused.weight"], who="my_estimator")
    vs = probes([model.unused.weight.shape], 2, seed=16)
    with pytest.raises(RuntimeError, match=r"my_estimator: none of the 1 targeted layers.*unused\.weight"):
        op.apply(vs, summarize=lambda products: products)


@pytest.mark.parametrize("batched", [True, False])
def test_a_weight_with_a_constant_gradient_warns_once_and_gives_a_zero_block(batched):
    """A loss linear in a weight whose gradient depends on no measured weight has a zero Hessian block;
    the operator says so in one RuntimeWarning naming it (not one per batch or per apply)."""
    model, batches = make(seed=17)
    for p in model.a.parameters():
        p.requires_grad_(False)
    loss_fn = lambda m, b: (m(b[0]) * b[1]).sum()  # noqa: E731
    op = HessianOperator(model, loss_fn, batches, [model.b.weight], batched=batched, names=["b.weight"])
    vs = probes([model.b.weight.shape], 2, seed=18)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = op.apply(vs, summarize=lambda products: products)
        second = op.apply(vs, summarize=lambda products: products)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "['b.weight']" in messages[0] and "Hessian blocks are 0" in messages[0]
    for got in (first, second):
        assert got[0].shape == vs[0].shape
        assert torch.equal(got[0], torch.zeros_like(vs[0]))


def test_a_non_finite_loss_makes_every_product_nan_and_names_its_batch():
    """A batch whose loss is NaN turns every product NaN even where its gradients are finite, and
    naming_the_batch() re-raises a NonFiniteProducts naming the first such batch (its index and value)."""
    model, batches = make(seed=19, n_batches=4)

    def loss_fn(m, b):
        loss = mse(m, b)
        # a constant NaN/inf term: the gradients stay finite, only the loss says the batch is broken
        bad = {id(batches[1]): float("nan"), id(batches[2]): float("inf")}.get(id(b))
        return loss + (torch.tensor(bad, dtype=DT) if bad is not None else 0.0)

    names = ["a.weight", "b.weight"]
    op = HessianOperator(model, loss_fn, batches, [model.a.weight, model.b.weight], names=names, who="est")
    vs = probes([model.a.weight.shape, model.b.weight.shape], 2, seed=20)
    got = op.apply(vs, summarize=lambda products: products)
    assert all(bool(torch.isnan(g).all()) for g in got)
    with pytest.raises(NonFiniteProducts, match=r"est: the loss on batch 1 is nan .*; inner") as info:
        with op.naming_the_batch():
            raise NonFiniteProducts("inner")
    assert str(info.value.__cause__) == "inner"


def test_naming_the_batch_passes_other_errors_through_when_every_loss_is_finite():
    """naming_the_batch() re-raises the NonFiniteProducts unchanged before any apply() and when every
    loss of the latest apply() was finite, even if an earlier apply() had a NaN loss."""
    model, batches = make(seed=21)
    nan_on = {"batch": 1}

    def loss_fn(m, b):
        broken = nan_on["batch"] is not None and b is batches[nan_on["batch"]]
        return mse(m, b) + (torch.tensor(float("nan"), dtype=DT) if broken else 0.0)

    op = HessianOperator(model, loss_fn, batches, [model.a.weight], names=["a.weight"])
    vs = probes([model.a.weight.shape], 2, seed=22)
    for step in ("fresh", "after a NaN apply", "after a finite apply"):
        if step == "after a NaN apply":
            assert bool(torch.isnan(op.apply(vs, summarize=lambda products: products)[0]).all())
            nan_on["batch"] = None
            continue
        if step == "after a finite apply":
            assert bool(torch.isfinite(op.apply(vs, summarize=lambda products: products)[0]).all())
        err = NonFiniteProducts("original")
        with pytest.raises(NonFiniteProducts) as info:
            with op.naming_the_batch():
                raise err
        assert info.value is err, step


def test_a_weight_reached_on_some_batches_only_is_measured_over_all():
    """A weight that only the first batch's loss reaches is measured (no no-gradient error): its
    products are those of the mean loss, in which the other batch adds nothing."""
    model, batches = make(seed=35, n_batches=2)

    def loss_fn(m, b):
        if b is batches[0]:
            return mse(m, b)
        return (m.unused(b[1]) ** 2).mean()  # a graph, but not through a or b

    op = HessianOperator(model, loss_fn, batches, [model.a.weight], batched=True, names=["a.weight"])
    vs = probes([model.a.weight.shape], 2, seed=36)
    got = op.apply(vs, summarize=lambda products: products)
    want = reference_products(joint_hessian(model, mse, batches[:1], ["a.weight"]), vs)
    torch.testing.assert_close(got[0], want[0] / 2, rtol=1e-9, atol=1e-12)


def test_a_loss_that_is_not_a_scalar_is_an_error_naming_the_estimator():
    """loss_fn returning a non-scalar is a ValueError naming the operator's estimator."""
    model, batches = make(seed=37)
    op = HessianOperator(model, lambda m, b: m(b[0]), batches, [model.a.weight], who="my_estimator")
    with pytest.raises(ValueError, match=r"my_estimator: loss_fn must return a scalar tensor, got shape \(5, 2\)"):
        op.apply(probes([model.a.weight.shape], 2, seed=38), summarize=lambda products: products)


def test_no_batches_is_an_error_naming_the_estimator():
    """An operator over no batches raises the ValueError that says so (not a no-gradient error)."""
    model, _ = make(seed=29)
    op = HessianOperator(model, mse, [], [model.a.weight], names=["a.weight"], who="my_estimator")
    with pytest.raises(ValueError, match=r"my_estimator: no batches on any of the 1 processes"):
        op.apply(probes([model.a.weight.shape], 2, seed=30), summarize=lambda products: products)


def test_batched_default_is_vmap_off_the_cpu_and_the_loop_on_it():
    """batched=None picks vmap for weights off the CPU and the per-probe loop for CPU weights; the
    names default to 'weight i'."""
    model, batches = make(seed=23)
    off_cpu = HessianOperator(model, mse, batches, [torch.empty(2, device="meta", requires_grad=True)])
    on_cpu = HessianOperator(model, mse, batches, [model.a.weight])
    assert off_cpu.batched is True and on_cpu.batched is False
    assert HessianOperator(model, mse, batches, [model.a.weight], batched=True).batched is True
    assert off_cpu.names == ["weight 0"]


def test_low_precision_products_are_summed_in_float32():
    """bfloat16 weights give products summed over batches in float32, close to the float64 products
    of the same (rounded) weights."""
    model, batches = make(seed=25, n_batches=4)
    ref_model, _ = make(seed=25)
    model = model.to(torch.bfloat16)
    ref_model.load_state_dict({k: v.to(DT) for k, v in model.state_dict().items()})
    low = [(x.to(torch.bfloat16), y.to(torch.bfloat16)) for x, y in batches]
    ref_batches = [(x.to(DT), y.to(DT)) for x, y in low]
    names = ["a.weight", "b.weight"]
    vs = probes([(4, 3), (2, 4)], 2, seed=26)
    op = HessianOperator(model, mse, low, [model.a.weight, model.b.weight], batched=True, names=names)
    got = op.apply([v.to(torch.bfloat16) for v in vs], summarize=lambda products: products)
    want = reference_products(joint_hessian(ref_model, mse, ref_batches, names), [v.to(torch.bfloat16).to(DT)
                                                                                   for v in vs])
    for g, w in zip(got, want):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g.double(), w, rtol=0.1, atol=0.05 * float(w.abs().max()))


class _FakeTorch(types.SimpleNamespace):
    """torch for lorambo.sensitivity.hvp, with autograd.grad raising ``error`` on its vmapped call."""

    def __getattr__(self, name):
        return getattr(torch, name)


def _torch_failing_batched(error):
    def grad(*args, **kwargs):
        if kwargs.get("is_grads_batched"):
            raise error
        return torch.autograd.grad(*args, **kwargs)
    return _FakeTorch(autograd=types.SimpleNamespace(grad=grad))


def test_out_of_memory_in_the_vmapped_backward_is_raised_not_retried(monkeypatch):
    """An out-of-memory error in the vmapped double backward propagates (the per-probe loop would not
    be the fix) and leaves the operator batched; another RuntimeError falls back to the loop with a
    warning and still gives the exact products."""
    model, batches = make(seed=27)
    names = ["a.weight", "b.weight"]
    weights = [model.a.weight, model.b.weight]
    vs = probes([w.shape for w in weights], 3, seed=28)
    op = HessianOperator(model, mse, batches, weights, batched=True, names=names)
    monkeypatch.setattr(hvp, "torch", _torch_failing_batched(torch.OutOfMemoryError("out of memory (test)")))
    with pytest.raises(torch.OutOfMemoryError, match="out of memory"):
        op.apply(vs, summarize=lambda products: products)
    assert op.batched is True
    monkeypatch.setattr(hvp, "torch", _torch_failing_batched(RuntimeError("vmap cannot batch this (test)")))
    with pytest.warns(RuntimeWarning, match=r"failed for this model: vmap cannot batch this \(test\) -- falling back"):
        got = op.apply(vs, summarize=lambda products: products)
    assert op.batched is False
    want = reference_products(joint_hessian(model, mse, batches, names), vs)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)


def test_a_looped_operator_never_tries_the_vmapped_backward(monkeypatch):
    """batched=False runs one double backward per probe only: a model vmap cannot batch gives no
    fallback warning and the exact products."""
    model, batches = make(seed=31)
    names = ["a.weight", "b.weight"]
    weights = [model.a.weight, model.b.weight]
    vs = probes([w.shape for w in weights], 3, seed=32)
    op = HessianOperator(model, mse, batches, weights, batched=False, names=names)
    monkeypatch.setattr(hvp, "torch", _torch_failing_batched(RuntimeError("vmap cannot batch this (test)")))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = op.apply(vs, summarize=lambda products: products)
    want = reference_products(joint_hessian(model, mse, batches, names), vs)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("batched,num,calls_per_batch,vmapped", [(True, 3, 2, 1), (False, 3, 4, 0), (True, 1, 2, 0)])
def test_backward_calls_per_batch(monkeypatch, batched, num, calls_per_batch, vmapped):
    """Per batch, the vmapped operator runs one gradient and one vmapped double backward for all P
    probes; the looped one (and a single probe) a gradient and one double backward per probe."""
    model, batches = make(seed=33, n_batches=2)
    names = ["a.weight", "b.weight"]
    weights = [model.a.weight, model.b.weight]
    vs = probes([w.shape for w in weights], num, seed=34)
    op = HessianOperator(model, mse, batches, weights, batched=batched, names=names)
    calls = []

    def grad(*args, **kwargs):
        calls.append(bool(kwargs.get("is_grads_batched")))
        return torch.autograd.grad(*args, **kwargs)

    monkeypatch.setattr(hvp, "torch", _FakeTorch(autograd=types.SimpleNamespace(grad=grad)))
    got = op.apply(vs, summarize=lambda products: products)
    assert len(calls) == calls_per_batch * len(batches)
    assert sum(calls) == vmapped * len(batches)
    want = reference_products(joint_hessian(model, mse, batches, names), vs)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)


def test_apply_keeps_no_graph_alive():
    """A batch's graph is released before the next batch's forward, and none is held after apply()
    returns (the batch losses kept for naming a non-finite batch are detached)."""
    model, batches = make(seed=39)
    hidden, earlier_alive = [], []

    def loss_fn(m, b):
        gc.collect()
        earlier_alive.append(any(ref() is not None for ref in hidden))
        h = torch.tanh(m.a(b[0]))
        hidden.append(weakref.ref(h))
        return ((m.b(h) - b[1]) ** 2).mean()

    op = HessianOperator(model, loss_fn, batches, [model.a.weight, model.b.weight], batched=False)
    op.apply(probes([model.a.weight.shape, model.b.weight.shape], 2, seed=40), summarize=lambda products: products)
    gc.collect()
    assert len(hidden) == len(batches) and all(ref() is None for ref in hidden)
    assert earlier_alive == [False] * len(batches)
