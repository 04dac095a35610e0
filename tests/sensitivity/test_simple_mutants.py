"""gradient_sensitivity, data_covariance and targets_without_gradient against float64 references and their
error paths.

Written from mutation testing of lorambo/sensitivity/simple.py.
"""

import pytest
import torch
from torch import nn

from lorambo.sensitivity import data_covariance, targets_without_gradient

DT = torch.float64


def mse(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def test_half_precision_inputs_are_summed_in_float32():
    """A bfloat16 model's layer inputs are converted to float32 before x^T x, so the covariance is
    float32 and matches the float64 token mean of the same (bfloat16) inputs."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).to(torch.bfloat16)
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(4, 32, 6, generator=gen).to(torch.bfloat16) + 1, torch.randn(4, 32, 3, generator=gen))
               for _ in range(3)]
    got = data_covariance(model, lambda m, b: m(b[0]), batches, modules=["0"], token_mask=None)["0"]
    x = torch.cat([b[0].reshape(-1, 6) for b in batches]).double()
    want = x.T @ x / x.shape[0]
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


class SkipsTokens(nn.Module):
    """Layer ``skipped`` is called on an empty slice of the tokens: it runs but sees no token."""

    def __init__(self, skipped):
        super().__init__()
        self.a = nn.Linear(3, 3, dtype=DT)
        self.b = nn.Linear(3, 3, dtype=DT)
        self.skipped = skipped

    def forward(self, x):
        out = 0
        for name in ("a", "b"):
            out = out + getattr(self, name)(x[:, :0] if name == self.skipped else x).sum()
        return out


@pytest.mark.parametrize("skipped", ["a", "b"])
def test_a_layer_that_never_gets_a_token_is_an_error_naming_it(skipped):
    """A layer called on no tokens over all batches (the first targeted one or a later one) is a
    ValueError naming it, not a 0/0 covariance."""
    model = SkipsTokens(skipped)
    gen = torch.Generator().manual_seed(2)
    batches = [torch.randn(2, 4, 3, generator=gen, dtype=DT) for _ in range(2)]
    with pytest.raises(ValueError, match=rf"data_covariance: layer\(s\) \['{skipped}'\] received 0 tokens over all"):
        data_covariance(model, lambda m, b: m(b), batches, modules=["a", "b"], token_mask=None)


def test_targets_without_gradient_refuses_a_loss_without_a_graph():
    """targets_without_gradient on a loss that does not depend on any targeted weight (no graph) is a
    ValueError naming the function, not a list of every layer."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 4, dtype=DT), nn.Linear(4, 2, dtype=DT))
    batch = (torch.randn(5, 3, dtype=DT), torch.randn(5, 2, dtype=DT))
    assert targets_without_gradient(model, mse, batch) == []
    with pytest.raises(ValueError, match=r"targets_without_gradient: the loss does not depend on the targeted"):
        targets_without_gradient(model, lambda m, b: torch.tensor(1.0, dtype=DT), batch)


def test_covariances_of_three_layers_match_token_means():
    """With three targeted layers each covariance is the token mean of x x^T of that layer's inputs."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(3, 4, dtype=DT), nn.Tanh(), nn.Linear(4, 5, dtype=DT), nn.Linear(5, 2, dtype=DT))
    gen = torch.Generator().manual_seed(5)
    batches = [torch.randn(2, t, 3, generator=gen, dtype=DT) for t in (3, 6)]
    got = data_covariance(model, lambda m, b: m(b), batches, token_mask=None)
    assert set(got) == {"0", "2", "3"}
    x0 = torch.cat([b.reshape(-1, 3) for b in batches])
    x2 = torch.tanh(model[0](x0)).detach()
    x3 = model[2](x2).detach()
    for name, x in (("0", x0), ("2", x2), ("3", x3)):
        torch.testing.assert_close(got[name], x.T @ x / x.shape[0], rtol=1e-12, atol=1e-14)


def test_unreached_by_any_needs_a_graph_on_the_first_batch_only():
    """The first batch's loss must depend on the targets (ValueError naming the caller otherwise);
    later batches are only asked about the layers still unreached, and one without a graph is fine."""
    from lorambo.sensitivity.simple import unreached_by_any

    torch.manual_seed(6)
    model = nn.ModuleDict({"a": nn.Linear(3, 2, dtype=DT), "b": nn.Linear(3, 2, dtype=DT)})
    gen = torch.Generator().manual_seed(7)
    xs = [torch.randn(4, 3, generator=gen, dtype=DT) for _ in range(3)]
    no_graph = lambda m, x: torch.tensor(0.5, dtype=DT)  # noqa: E731
    with pytest.raises(ValueError, match=r"my_caller: the loss does not depend on the targeted weights"):
        unreached_by_any(model, no_graph, xs, ["a", "b"], "my_caller")
    calls = []

    def loss_fn(m, x):
        calls.append(x)
        if x is xs[0]:
            return m["a"](x).square().sum()
        return torch.tensor(0.5, dtype=DT)  # later batches reach nothing: no graph, no error

    assert unreached_by_any(model, loss_fn, xs, ["a", "b"], "my_caller") == ["b"]
    assert len(calls) == 3


def test_progress_bars_count_batches(capsys):
    """With progress=True, gradient_sensitivity and data_covariance draw a bar of batches on stderr,
    named after the function and counted in batches."""
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(3, 4, dtype=DT), nn.Linear(4, 2, dtype=DT))
    gen = torch.Generator().manual_seed(9)
    batches = [(torch.randn(5, 3, generator=gen, dtype=DT), torch.randn(5, 2, generator=gen, dtype=DT))
               for _ in range(3)]
    from lorambo.sensitivity import gradient_sensitivity

    for name, run in (("gradient_sensitivity", lambda: gradient_sensitivity(model, mse, batches, progress=True)),
                      ("data_covariance", lambda: data_covariance(model, mse, batches, progress=True))):
        run()
        err = capsys.readouterr().err
        assert name in err and "3/3" in err and "batch" in err, (name, err)
