"""FisherProxy(sketch_dim=k): the reported stderr covers the sketch's own error. Examples that
shared one probe per call shared their sketch errors, which the spread over examples does not
show: on similar examples the stderr was ~10x smaller than the sketched value's error."""

import torch
from torch import nn

from lorambo.sensitivity import FisherProxy

DT = torch.float64


def similar_batches():
    """Three batches of 16 examples, each one example plus a little noise (8 tokens each)."""
    g = torch.Generator().manual_seed(0)
    x0, y0 = torch.randn(1, 8, 6, generator=g, dtype=DT), torch.randn(1, 8, 5, generator=g, dtype=DT)
    return [(x0 + 0.05 * torch.randn(16, 8, 6, generator=g, dtype=DT),
             y0 + 0.05 * torch.randn(16, 8, 5, generator=g, dtype=DT)) for _ in range(3)]


def reference(model, batches):
    """Mean over examples of ||dL_n/dW||^2 from per-example autograd gradients, per layer."""
    sq = {"0": [], "2": []}
    for x, y in batches:
        for n in range(x.shape[0]):
            loss = (model(x[n:n + 1]) - y[n:n + 1]).square().sum()
            for name, grad in zip(sq, torch.autograd.grad(loss, [model[0].weight, model[2].weight])):
                sq[name].append(float(grad.square().sum()))
    return {name: sum(v) / len(v) for name, v in sq.items()}


def test_sketched_stderr_matches_the_sketch_error_over_seeds():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10, dtype=DT), nn.Tanh(), nn.Linear(10, 5, dtype=DT))
    batches = similar_batches()
    exact = reference(model, batches)
    z2 = {name: [] for name in exact}
    for seed in range(100):
        with FisherProxy(model, sketch_dim=2, seed=seed, reduction="sum") as proxy:
            for x, y in batches:
                model.zero_grad()
                (model(x) - y).square().sum().backward()
        for name, est in proxy.estimates().items():
            z2[name].append(((est.value - exact[name]) / est.stderr) ** 2)
    # E z^2 ~ 1.1 here (1.14 and 0.96 on these seeds, 1.09 and 1.16 over 300 others); with shared
    # probes it was 95. The mean of z^2 over 100 seeds has a standard deviation of ~0.2, so 2.0 is
    # over 4 of them above it (seeded, so deterministic; a fresh set of seeds fails with p ~1e-4)
    for name, values in z2.items():
        assert sum(values) / len(values) < 2.0, (name, sum(values) / len(values))
