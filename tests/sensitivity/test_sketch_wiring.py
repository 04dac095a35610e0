"""The sensitivity statistics on the grouped sketch kernels (``LORAMBO_SKETCH=triton``, under the
Triton interpreter on CPU) against float64 references, and their collectives."""

import pytest
import torch
from torch import nn

from lorambo import configure_model, distributed
from lorambo.ops.sketch import set_sketch_backend
from lorambo.sensitivity import FisherProxy, fisher as fisher_module
from lorambo.sensitivity.reductions import per_layer_dots, per_layer_sq_norms

pytest.importorskip("triton")

# the kernels run on CUDA where there is one, else on CPU under the Triton interpreter
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def kernels():
    set_sketch_backend("triton")
    yield
    set_sketch_backend(None)


def test_dots_and_norms_on_the_kernels_match_float64(kernels):
    shapes = [(4, 5, 3), (4, 77), (4, 1)]
    xs = [torch.randn(s).to(DEV) for s in shapes]
    ys = [torch.randn(s).to(DEV) for s in shapes]
    want = torch.stack([(x.double().flatten(1) * y.double().flatten(1)).sum(1) for x, y in zip(xs, ys)], 1)
    torch.testing.assert_close(per_layer_dots(xs, ys), want, rtol=1e-5, atol=1e-5)
    mixed = [torch.randn(6, 5), torch.randn(33).to(torch.bfloat16), torch.randn(2, 3)]  # two dtypes
    mixed = [t.to(DEV) for t in mixed]
    torch.testing.assert_close(per_layer_sq_norms(mixed), torch.stack([x.double().square().sum() for x in mixed]),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="lorambo.ops.sketch.*float64"):
        wide = torch.randn(2, 3, dtype=torch.float64, device=DEV)
        per_layer_dots([wide], [wide])


def test_requested_kernels_under_an_incompatible_interpreter_raise(monkeypatch):
    numpy, triton = pytest.importorskip("numpy"), pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(triton, "__version__", "3.6.0")
    monkeypatch.setattr(numpy, "__version__", "2.4.6")
    xs = [torch.randn(4, 5)]
    set_sketch_backend("triton")
    try:
        with pytest.raises(RuntimeError, match="lorambo.ops.sketch.*triton 3.6.0's interpreter.*numpy 2.4.6"):
            per_layer_dots(xs, xs)
    finally:
        set_sketch_backend(None)


def test_torch_loop_dots_accumulate_bfloat16_in_fp32():
    set_sketch_backend("torch")
    try:
        import lorambo
        lorambo.set_backend("torch")  # the plain loop, not the compiled extension
        x = torch.randn(3, 4000).to(torch.bfloat16)
        y = torch.randn(3, 4000).to(torch.bfloat16)
        want = (x.double() * y.double()).sum(1)
        torch.testing.assert_close(per_layer_dots([x], [y])[:, 0], want, rtol=1e-5, atol=1e-4)
    finally:
        set_sketch_backend(None)


class TokenNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 24), nn.Linear(24, 16)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def _fisher(model, x, y):
    with FisherProxy(model) as fisher:
        (model(x) - y).square().flatten(1).sum(1).mean().backward()
    return fisher.estimates()


def test_fisher_proxy_gram_kernel_matches_float64(kernels, monkeypatch):
    torch.manual_seed(0)
    model = configure_model(TokenNet(), 2).to(DEV)
    with torch.no_grad():
        for m in (model.fc1, model.fc2):
            m.lora_B.normal_()
    x, y = torch.randn(5, 3, 16).to(DEV), torch.randn(5, 3, 16).to(DEV)  # 3 tokens: Gram is cheaper
    calls = []
    real = fisher_module.sq_grad_norms_many
    monkeypatch.setattr(fisher_module, "sq_grad_norms_many", lambda *a: calls.append(1) or real(*a))
    reduces = []
    real_reduce = distributed.all_reduce_sum_
    monkeypatch.setattr(distributed, "all_reduce_sum_", lambda t: reduces.append(t.shape) or real_reduce(t))
    got = _fisher(model, x, y)
    # every layer; one collective for both layers' (sum, sum_sq, n, non-finite, padding rows) and the
    # 3 numbers of the processes' shared status (failure flag, settings fingerprint and its square)
    assert len(calls) == 2 and reduces == [(2 * 5 + 3,)]
    set_sketch_backend("torch")
    reference = _fisher(model.double(), x.double(), y.double())
    for name in ("fc1", "fc2"):
        assert got[name].value == pytest.approx(reference[name].value, rel=1e-5)
        assert got[name].stderr == pytest.approx(reference[name].stderr, rel=1e-3)
        assert got[name].num_probes == reference[name].num_probes == 5
