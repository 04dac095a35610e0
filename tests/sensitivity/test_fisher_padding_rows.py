"""FisherProxy(reduction="token_mean"): a row of padding (no real token) is no example. It was
counted in the mean with a zero gradient, so one padding row in a batch of three lowered the
trace by a quarter, where the README promises traces that do not depend on padding."""

import pytest
import torch
from torch import nn

from lorambo.sensitivity import FisherProxy

DT = torch.float64


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 6, dtype=DT), nn.Linear(6, 3, dtype=DT)

    def forward(self, x, attention_mask):
        return self.fc2(torch.tanh(self.fc1(x)))


def token_mean_loss(model, x, y, mask):
    per_token = (model(x=x, attention_mask=mask) - y).square().sum(-1)
    return (per_token * mask).sum() / mask.sum()


def batches():
    """Two batches; the first ends with a row of padding, the second has a short row."""
    g = torch.Generator().manual_seed(0)
    out = []
    for rows, empty in ((4, True), (3, False)):
        x, y = torch.randn(rows, 5, 4, generator=g, dtype=DT), torch.randn(rows, 5, 3, generator=g, dtype=DT)
        mask = torch.ones(rows, 5, dtype=torch.long)
        mask[1, 2:] = 0
        if empty:
            mask[-1] = 0
        out.append((x, y, mask))
    return out


def reference(model, data):
    """Mean over the examples with real tokens of ||grad of its own token-mean loss||^2."""
    sq = {"fc1": [], "fc2": []}
    for x, y, mask in data:
        for n in range(x.shape[0]):
            if mask[n].sum() == 0:
                continue
            loss = token_mean_loss(model, x[n:n + 1], y[n:n + 1], mask[n:n + 1])
            for name, grad in zip(sq, torch.autograd.grad(loss, [model.fc1.weight, model.fc2.weight])):
                sq[name].append(float(grad.square().sum()))
    return {name: (sum(v) / len(v), len(v)) for name, v in sq.items()}


def measure(model, data, proxy):
    with proxy:
        for x, y, mask in data:
            model.zero_grad()
            token_mean_loss(model, x, y, mask).backward()
    return proxy


def test_a_row_of_padding_is_not_an_example_and_survives_a_resume():
    torch.manual_seed(0)
    model, data = Net(), batches()
    want = reference(model, data)
    est = measure(model, data, FisherProxy(model, reduction="token_mean")).estimates()
    for name, (value, count) in want.items():
        assert est[name].value == pytest.approx(value, rel=1e-10), name
        assert est[name].num_probes == count == 6
    # the padding count travels in the state: a resume after the first batch ends the same
    first = measure(model, data[:1], FisherProxy(model, reduction="token_mean")).state_dict()
    resumed = FisherProxy(model, reduction="token_mean")
    resumed.load_state_dict(first)
    again = measure(model, data[1:], resumed).estimates()
    for name, (value, count) in want.items():
        assert again[name].value == pytest.approx(value, rel=1e-10), name
        assert again[name].num_probes == count


def test_only_padding_is_an_error_naming_the_layer():
    torch.manual_seed(0)
    model = Net()
    x, y = torch.randn(2, 5, 4, dtype=DT), torch.randn(2, 5, 3, dtype=DT)
    proxy = FisherProxy(model, reduction="token_mean")
    with proxy:
        model.zero_grad()
        out = model(x=x, attention_mask=torch.zeros(2, 5, dtype=torch.long))
        (out - y).square().sum().backward()  # a loss over nothing real, as a sum: no NaN
    with pytest.raises(RuntimeError, match=r"none of the 2 examples through layer 'fc1' a real token"):
        proxy.estimates()
