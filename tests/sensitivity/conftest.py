"""Tiny float64 models with exact dense per-layer Hessians for the sensitivity tests.

Inputs are random (not hand-picked) but seeded, so the statistical checks (3 standard errors)
are reproducible rather than flaky.
"""

import pytest
import torch
from torch import nn

DT = torch.float64



@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    """Every sensitivity test runs on one thread (see tests/conftest.py)."""


def mse(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).mean()


class Attention(nn.Module):
    """One softmax attention block, q/k/v/o projections without bias."""

    def __init__(self, d=6):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d, bias=False, dtype=DT) for _ in range(4))

    def forward(self, x):                                   # x (B, T, d)
        att = (self.q(x) @ self.k(x).transpose(1, 2)) / self.q.in_features ** 0.5
        return self.o(att.softmax(-1) @ self.v(x))


def make_mlp(seed=0, n_batches=3):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 12, dtype=DT), nn.Tanh(), nn.Linear(12, 4, dtype=DT))
    batches = [(torch.randn(10, 6, generator=g, dtype=DT), torch.randn(10, 4, generator=g, dtype=DT))
               for _ in range(n_batches)]
    return model, mse, batches


def make_attention(seed=0, n_batches=2):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = Attention()
    batches = [(torch.randn(3, 5, 6, generator=g, dtype=DT), torch.randn(3, 5, 6, generator=g, dtype=DT))
               for _ in range(n_batches)]
    return model, mse, batches


class _Call(nn.Module):
    def __init__(self, model, loss_fn):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, batch):
        return self.loss_fn(self.model, batch)


def dense_hessian(model, loss_fn, batches, weight):
    """Exact Hessian of the mean loss over batches w.r.t. one weight tensor, [numel, numel]."""
    pname = next(n for n, p in model.named_parameters() if p is weight)
    call = _Call(model, loss_fn)

    def f(flat):
        w = flat.view(weight.shape)
        return sum(torch.func.functional_call(call, {"model." + pname: w}, (b,))
                   for b in batches) / len(batches)

    return torch.autograd.functional.hessian(f, weight.detach().reshape(-1).clone())


def weight_of(model, name):
    m = model.get_submodule(name)
    return m.base_layer.weight if hasattr(m, "base_layer") else m.weight


@pytest.fixture(params=["mlp", "attention"])
def case(request):
    return make_mlp() if request.param == "mlp" else make_attention()


@pytest.fixture
def h():
    """The helpers above, as a fixture (test modules cannot import conftest portably)."""
    from types import SimpleNamespace
    return SimpleNamespace(DT=DT, mse=mse, make_mlp=make_mlp, make_attention=make_attention,
                           dense_hessian=dense_hessian, weight_of=weight_of, Attention=Attention)
