"""A model copied while a FisherProxy is attached (an EMA or teacher by deepcopy, a checkpoint by
torch.save / pickle) pickles, and its copy carries hooks that do nothing: the copy's training
steps are not counted into the original's Fisher traces, also after detach() (as they would be
through hook closures shared by a deep copy)."""


import pytest
import torch
from torch import nn

from lorambo.sensitivity import FisherProxy

from model_copies import COPIER_IDS, COPIERS

DT = torch.float64


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7, dtype=DT), nn.Tanh(), nn.Linear(7, 3, dtype=DT))


def _batch(seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(4, 5, dtype=DT, generator=gen), torch.randn(4, 3, dtype=DT, generator=gen)


def _loss(model, x, y):
    return (model(x) - y).square().mean()


def _naive_traces(model, batches) -> list[torch.Tensor]:
    """mean_n ||dL_n/dW||^2 per Linear weight, one example at a time (L_n: the loss of the
    one-example batch, the per-example loss of reduction='mean')."""
    weights = [model[0].weight, model[2].weight]
    sq = [[], []]
    for x, y in batches:
        for n in range(x.shape[0]):
            for i, g in enumerate(torch.autograd.grad(_loss(model, x[n:n + 1], y[n:n + 1]), weights)):
                sq[i].append(g.square().sum())
    return [torch.stack(v).mean() for v in sq]


@pytest.mark.parametrize("copier", COPIERS, ids=COPIER_IDS)
def test_a_copy_taken_while_attached_is_not_counted(copier):
    model, first, last, other = _net(), _batch(1), _batch(2), _batch(3)
    proxy = FisherProxy(model)
    with proxy:
        _loss(model, *first).backward()
        twin = copier(model)  # trained beside the original, on other data
        _loss(twin, *other).backward()
        _loss(model, *last).backward()
    _loss(twin, *other).backward()  # after detach() too
    got = proxy.estimates()
    expected = _naive_traces(model, [first, last])
    for name, value in zip(["0", "2"], expected):
        assert got[name].num_probes == 8, name
        torch.testing.assert_close(torch.tensor(got[name].value, dtype=DT), value, rtol=1e-10, atol=0)
    # the copy is a plain model: it computes what the original does
    with torch.no_grad():
        torch.testing.assert_close(twin(other[0]), model(other[0]), rtol=0, atol=0)
